import hashlib

import torch

from dori.attacks.dori import DoRI
from dori.data.prompts import load_reference
from dori.data.tiny import tiny_prompt_set


def _hash(unet):
    h = hashlib.sha256()
    for _, p in sorted(unet.state_dict().items()):
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def test_dori_loss_falls_and_only_the_embedding_changes(tiny_pipe):
    rec = next(r for r in tiny_prompt_set() if r.kind == "memorized")
    img = load_reference(rec)[None]
    before = _hash(tiny_pipe.unet)
    res = DoRI(steps=12, lr=0.05, init="random", restarts=2).attack(tiny_pipe, img)
    assert res.trigger.shape == (2, 77, 64) and res.target_index == [0, 0]
    first, last = torch.tensor(res.loss[:3]).mean(), torch.tensor(res.loss[-3:]).mean()
    assert last < first
    assert res.distance[-1][0] > 0 and len(res.loss) == 12
    assert _hash(tiny_pipe.unet) == before
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())


def test_dori_positions_limit_which_tokens_move(tiny_pipe):
    rec = next(r for r in tiny_prompt_set() if r.kind == "memorized")
    res = DoRI(steps=3, positions=[10, 11, 12]).attack(tiny_pipe, load_reference(rec)[None], prompts=[rec.caption])
    moved = (res.trigger - res.init).abs().amax(dim=(0, 2))
    assert moved[[10, 11, 12]].min() > 0
    assert moved[:10].max() == 0 and moved[13:].max() == 0
