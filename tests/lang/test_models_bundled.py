"""Per-call models on the real engine: two random LoRA adapters made with peft on the bundled model, served
by one ``pl.Runtime(lora_paths=...)``; outputs compared with direct engine calls on the same prompt."""

from __future__ import annotations

import pytest

import plait as pl
from tests.lora_helpers import save_random_adapters

pytestmark = pytest.mark.model
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

GREEDY = {"temperature": 0.0, "max_new_tokens": 6}
MODELS = ["writer", "judge", None]


@pytest.fixture(scope="module")
def adapter_paths(bundled_model_dir, tmp_path_factory) -> dict[str, str]:
    """Two random adapters (different ranks and modules), saved in PEFT format."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32)
    adapters = {"writer": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
                "judge": {"r": 2, "lora_alpha": 4, "target_modules": ["o_proj", "down_proj"]}}
    return save_random_adapters(model, adapters, tmp_path_factory.mktemp("lang-lora"))[1]


@pytest.fixture(scope="module")
def rt(bundled_model_dir, adapter_paths):
    from plait.lang.backends.runtime import Runtime

    runtime = Runtime(model=str(bundled_model_dir), dtype="float32", max_total_tokens=4096, lora_paths=adapter_paths)
    yield runtime
    runtime.shutdown()


@pl.function
def three_models(s):
    s += "The three best things about tea are"
    forks = s.fork(3)
    for branch, model in zip(forks, MODELS):
        with branch.using(model=model):
            branch += pl.gen("text", max_tokens=GREEDY["max_new_tokens"])
    forks.join()
    s += " Is tea good? Answer:" + pl.select("verdict", ["yes", "no"], model="judge")


def test_each_call_is_served_by_its_adapter_and_kv_is_not_shared(rt):
    assert rt.per_call_models
    state = three_models.run(backend=rt, temperature=0)
    prompt = "The three best things about tea are"
    direct = [rt.engine.generate(prompt, GREEDY, lora_path=m)["text"] for m in MODELS]
    assert state["text"] == direct
    assert len(set(direct)) == 3  # the adapters change what the model says
    by_branch = {c.branch: c for c in state.calls if c.name == "text"}
    assert [by_branch[i].model for i in range(3)] == MODELS
    # the fork prefilled its prefix under the scope's (base) model: only the base branch hits it
    assert by_branch[2].cached_tokens > 0 and by_branch[0].cached_tokens == by_branch[1].cached_tokens == 0
    # the select scored its choices under the judge: the base model's scores differ
    judged = state.get_meta_info("verdict")
    scored_prefix = prompt + " Is tea good? Answer:"
    under_judge = [c.token_logprobs for c in rt.score_choices(scored_prefix, ["yes", "no"], model="judge")]
    under_base = [c.token_logprobs for c in rt.score_choices(scored_prefix, ["yes", "no"])]
    assert judged["model"] == "judge" and judged["token_logprobs"] == under_judge != under_base
