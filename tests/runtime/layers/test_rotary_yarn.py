"""YaRN rotary scaling against transformers' ``_compute_yarn_parameters`` (bit for bit), and the
attention factor applied to the cos/sin tables."""

from __future__ import annotations

import math

import pytest
import torch

from plait.runtime.layers.rotary import RotaryEmbedding, rope_attention_factor, rope_inv_freq

transformers = pytest.importorskip("transformers")

GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "original_max_position_embeddings": 4096, "truncate": False}


@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("extra", [
    {}, {"truncate": True}, {"truncate": None}, {"beta_fast": 16.0, "beta_slow": 2.0}, {"attention_factor": 1.3},
    {"mscale": 1.0, "mscale_all_dim": 0.5}, {"factor": 4.0},
], ids=["gpt-oss", "truncate", "truncate-default", "betas", "attention-factor", "mscale", "factor-4"])
def test_yarn_matches_transformers(head_dim, extra):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {**GPT_OSS_YARN, **extra}
    if scaling["truncate"] is None:
        del scaling["truncate"]  # transformers' default: True
    config = transformers.GptOssConfig(head_dim=head_dim, rope_parameters={**scaling, "rope_theta": 150000.0})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    assert torch.equal(rope_inv_freq(head_dim, 150000.0, scaling), inv_freq)
    assert rope_attention_factor(scaling) == attention_factor


def test_yarn_scales_the_tables_in_float32():
    rotary = RotaryEmbedding(64, 32, 150000.0, GPT_OSS_YARN)
    rotary.build_cache(torch.device("cpu"), torch.bfloat16)
    factor = 0.1 * math.log(32.0) + 1.0
    freqs = torch.outer(torch.arange(32, dtype=torch.float32), rope_inv_freq(64, 150000.0, GPT_OSS_YARN))
    emb = torch.cat((freqs, freqs), -1)
    assert torch.equal(rotary.cos_cache, (emb.cos() * factor).to(torch.bfloat16))
    assert torch.equal(rotary.sin_cache, (emb.sin() * factor).to(torch.bfloat16))
    assert rope_attention_factor(None) == 1.0 and rope_attention_factor({"rope_type": "llama3"}) == 1.0
