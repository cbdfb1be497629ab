"""benchmarks/maskbench.py on a few MaskBench-format files written here (the real data is not in the
repository): the pass rule, the failure kinds, the sample and the table."""

from __future__ import annotations

import json

import pytest

from plait.runtime.constrained.limits import GrammarLimits
from tests.benchmark_scripts import load_benchmark

pytestmark = pytest.mark.model  # the bundled model's tokenizer

CASES = {
    # the regression: a json.dumps document whose tokens span a forced stretch's end
    "shebang.json": {"schema": {"properties": {"p": {"type": "string", "pattern": "^#!"}}},
                     "tests": [{"data": {"p": "#!"}, "valid": True}, {"data": {"p": "#?"}, "valid": False}]},
    "int.json": {"schema": {"type": "integer", "minimum": 3},
                 "tests": [{"data": 5, "valid": True}, {"data": 2, "valid": False}]},
    "no_tests.json": {"schema": {"type": "boolean"}},
    # a wrong label: the valid-marked instance breaks the schema, so both sides reject it
    "mislabelled.json": {"schema": {"type": "string", "maxLength": 2}, "tests": [{"data": "abcd", "valid": True}]},
    "too_big.json": {"schema": {"type": "object", "description": "x" * 300}, "tests": []},
    # compiled only relaxed ("not" dropped): 3 passes the grammar, fails validation; usable
    "relaxed.json": {"schema": {"type": "integer", "minimum": 0, "not": {"const": 3}},
                     "tests": [{"data": 5, "valid": True}, {"data": 3, "valid": False}, {"data": -1, "valid": False}]},
    # relaxed, and jsonschema does not check "url": the invalid-marked instance would be delivered as valid
    "delivered.json": {"schema": {"type": "string", "format": "url"},
                       "tests": [{"data": "http://a.b", "valid": True}, {"data": "no url", "valid": False}]},
    # relaxed, but llguidance refuses the valid document (it writes the enum's 0.0 as 0)
    "refused.json": {"schema": {"enum": [{"a": 0.0}], "not": {"const": 1}}, "tests": [{"data": {"a": 0.0}, "valid": True}]},
    # relaxed; llguidance fixes the key order ("a" before "b"): usable only in key order
    "order.json": {"schema": {"properties": {"a": {"type": "integer"}, "b": {"type": "array", "items": {
        "properties": {"x": {}, "y": {}}}}}, "not": {"required": ["c"]}},
                   "tests": [{"data": {"b": [{"y": 1, "x": [2]}], "a": 2}, "valid": True}]},
}


@pytest.fixture(scope="module")
def maskbench():
    return load_benchmark("maskbench")


def test_pass_rule_kinds_and_table(maskbench, tokenizer_info, tmp_path):
    for name, case in CASES.items():
        (tmp_path / name).write_text(json.dumps(case))
    results = maskbench.run(tmp_path, None, 0, limits=GrammarLimits(max_bytes=200), info=tokenizer_info)
    plait, llg = results["plait"], results["llguidance"]
    assert (plait["tried"], plait["pass"], plait["limit"], plait["valid_rejected"]) == (9, 3, 1, 1)
    assert (llg["tried"], llg["pass"], llg["valid_rejected"], llg["compile"]) == (9, 4, 1, 4)
    relaxed = {"relaxed.json", "delivered.json", "refused.json", "order.json"}
    assert {f[0] for f in plait["failed"]} == {"mislabelled.json", "too_big.json"} | relaxed
    assert (plait["relaxed"], plait["usable"], plait["invalid_delivered"]) == (4, 4, 1)  # usable: 3 exact + 1
    assert plait["usable_key_order"] == 5  # and order.json, its keys reordered (a, b; x, y)
    assert dict(plait["not_usable"]) == {"delivered.json": "invalid instance 1 accepted and validated",
                                         "refused.json": "valid instance 0 refused by the relaxed grammar",
                                         "order.json": "valid instance 0 refused by the relaxed grammar"}
    assert len(plait["compile_s"]) == 4 and plait["mask_s"]
    table = maskbench.table(results)
    assert table.splitlines()[2].startswith("| plait | 9 | 3 | 1 | 4 | 0 | 1 | 0 |")
    assert 0 < len(plait["first_s"]) <= len(plait["compile_s"])  # schemas compiled with an instance walked
    assert len(table.splitlines()[0].split("|")) == len(table.splitlines()[2].split("|"))
    sampled = maskbench.load_cases(tmp_path, 2, seed=1)
    assert len(sampled) == 2 and sampled == maskbench.load_cases(tmp_path, 2, seed=1)


def test_llguidance_side_with_plaits_options(maskbench, tokenizer_info):
    """--llguidance-options plait: raw llguidance compiles plait's grammar (a space at most between JSON
    tokens, so a newline is refused) instead of its default one (free whitespace)."""
    from plait.runtime.constrained.backends.llguidance_backend import LLGuidanceBackend

    tokenizer = LLGuidanceBackend().tokenizer_for(tokenizer_info)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    newline = [(tokenizer_info.encode('{\n"a": 1}'), True)]
    assert maskbench.LLGuidanceSide(tokenizer_info, tokenizer).run(schema, newline) is None
    assert maskbench.LLGuidanceSide(tokenizer_info, tokenizer, "plait").run(schema, newline) == "valid_rejected"
    with pytest.raises(ValueError, match="options"):
        maskbench.LLGuidanceSide(tokenizer_info, tokenizer, "other")
