export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 300 python benchmarks/gpu.py --model gpt-oss-120b --only c --offline-lengths 1024,1024 --engine-arg kv_cache_dtype=fp8_e4m3 --engine-arg cuda_graph_max_bs=1024 --engine-arg chunked_prefill_size=8192 2>&1 | grep "^| c\|model \`"
