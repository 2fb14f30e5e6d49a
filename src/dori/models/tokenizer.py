"""Build the real CLIP BPE tokenizer (49,408 tokens) from the merges file CLIP ships.

Stable Diffusion v1.x tokenizes with OpenAI CLIP's byte-level BPE. Its vocabulary is fully determined
by CLIP's merges file ``bpe_simple_vocab_16e6.txt.gz`` (it ships inside the ``open-clip-torch`` wheel):
256 byte symbols, the same with an end-of-word marker, the first 48,894 merges, then the two special
tokens. The embedded tiny model ships the resulting ``vocab.json``/``merges.txt``; this module is the
reproducible recipe for them (``dori zoo build-tokenizer``).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP uses exactly this many merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_clip_tokenizer_files(bpe_gz: str | Path, out_dir: str | Path) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer config for SD v1.x's CLIP tokenizer.

    Args:
        bpe_gz: path to CLIP's ``bpe_simple_vocab_16e6.txt.gz``.
        out_dir: folder to write (a ``tokenizer/`` folder of a diffusers pipeline).

    Returns:
        ``out_dir`` as a Path.
    """
    bpe_gz, out_dir = Path(bpe_gz), Path(out_dir)
    if not bpe_gz.is_file():
        raise FileNotFoundError(
            f"CLIP merges file not found: {bpe_gz}. It ships in the open-clip-torch wheel as "
            "open_clip/bpe_simple_vocab_16e6.txt.gz (`pip download --no-deps open-clip-torch`, then unzip)."
        )
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != 49408:
        raise ValueError(f"{bpe_gz} does not look like CLIP's merges file: built {len(vocab)} tokens, not 49408")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",  # SD v1.x pads with end-of-text
        "do_lower_case": True,
        "errors": "replace",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir
