"""The grammar backends read token bytes from plait's own table, whatever the tokenizer JSON's decoder.

transformers 5.17 imports the bundled GGUF tokenizer with a ``ByteFallback, Fuse, Replace, ByteLevel``
decoder sequence; llguidance, reading that JSON itself, then mis-mapped byte-level tokens and refused
valid JSON (seen on a GPU machine with transformers 5.17). Here the bundled tokenizer gets that
decoder and the llguidance backend must still accept valid documents and refuse invalid ones.
"""

from __future__ import annotations

import pytest

from plait.runtime.constrained import GrammarCompiler, GrammarState, TokenizerInfo
from plait.runtime.constrained.backends.llguidance_backend import LLGuidanceBackend
from plait.runtime.constrained.spec import ConstraintKind, ConstraintSpec
from tests.runtime.constrained.conftest import walk

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def fallback_decoder_info(bundled_model_dir):
    from tokenizers import decoders

    from plait.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(bundled_model_dir)
    tok.hf.backend_tokenizer.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\u2581", " "), decoders.ByteLevel()]
    )
    return TokenizerInfo.from_tokenizer(tok)


def test_llguidance_with_a_byte_fallback_decoder(fallback_decoder_info):
    info = fallback_decoder_info
    # llguidance reading this JSON itself would mis-map byte-level tokens: the wrapper over plait's table
    assert LLGuidanceBackend().vocabulary_kind(info) == "wrapper"
    compiler = GrammarCompiler(info, backend="llguidance")
    try:
        schema = '{"type": "object", "properties": {"born": {"type": "string", "format": "date"}}, "required": ["born"]}'
        grammar = compiler.compile(ConstraintSpec(ConstraintKind.JSON_SCHEMA, schema))
        eos = frozenset(info.stop_ids)
        assert walk(GrammarState(grammar, info, eos), info, '{"born": "2000-01-01"}') == (True, True)
        accepted, complete = walk(GrammarState(grammar, info, eos), info, '{"born": "2000-99-01"}')
        assert not (accepted and complete)
        regex = compiler.compile(ConstraintSpec(ConstraintKind.REGEX, r"Hello, (world|there)!"))
        assert walk(GrammarState(regex, info, eos), info, "Hello, there!") == (True, True)
    finally:
        compiler.shutdown()
