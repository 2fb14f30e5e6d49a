"""The CUDA paths, checked against the CPU's: skipped unless asked, ``pytest -m gpu`` on a machine with CUDA.

The CPU suite checks the algorithms; these check that each stage runs where the 500-prompt studies run,
keeps its work on the device, and agrees with the CPU up to float order.
"""

import json

import pytest
import torch

from dori import load_pipeline, load_prompt_set
from dori.attacks.dori import DoRI
from dori.data.prompts import load_reference
from dori.data.tiny import tiny_stats_prompts
from dori.metrics.pixel import PixelSSIM
from dori.mitigations.masks import apply_mask
from dori.mitigations.nemo import NeMo
from dori.mitigations.wanda import Wanda
from dori.models.generate import generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device: `pytest -m gpu` on a machine with one")]
MEMORIZED = "chelsea the orange tabby cat looking up"


@pytest.fixture(autouse=True)
def _cuda_determinism():
    """Some CUDA kernels the UNet's backward uses (nearest upsampling) have no deterministic version:
    warn instead of failing for them (every check below compares with a tolerance or a selection).
    TF32 convolutions (PyTorch's default on CUDA) round to 10-bit mantissas; off here, so a difference
    from the CPU is dori's device handling, not the hardware's precision."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = tf32
    torch.use_deterministic_algorithms(True)


@pytest.fixture(scope="module")
def cuda_pipe():
    return load_pipeline("tiny", device="cuda")


def test_generation_on_cuda_matches_the_cpu(tiny_pipe, cuda_pipe):
    prompts = [MEMORIZED, "a red circle", "close up of a grey brick wall"]
    cpu = generate(tiny_pipe, prompts, seeds=[0, 1]).images
    gpu = generate(cuda_pipe, prompts, seeds=[0, 1]).images
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape
    gpu = gpu.cpu()
    assert float((gpu - cpu).abs().mean()) < 1e-2, float((gpu - cpu).abs().mean())
    assert float(PixelSSIM().pairwise(gpu, cpu).diagonal().min()) > 0.95, PixelSSIM().pairwise(gpu, cpu).diagonal()


def test_nemo_on_cuda_selects_what_the_reference_procedure_selects(cuda_pipe, tmp_path):
    """dori's default (one check per UNet call, prefix replay) against the reference's one full UNet call
    per check: the same neurons. Batched checks (16 per call) agree only up to the float rounding a
    batch's size changes on CUDA: near the threshold a decision can flip (``benchmarks/nemo_batched.py
    --device cuda``: 3 of 8 captions identical, the rest within 4 neurons), so they are compared loosely."""
    kw = dict(cuda_pipe.dori_method_defaults.get("nemo", {})) | {"stats_cache": tmp_path}
    stats = tiny_stats_prompts()
    for prompt in (MEMORIZED, "a cup of coffee on a saucer seen from above"):
        ref = NeMo(**kw, batch_candidates=1, reuse_prefix=False).localize(cuda_pipe, prompt, stats)
        run = NeMo(**kw).localize(cuda_pipe, prompt, stats)
        assert ref.memorized and run.memorized and len(ref.mask) > 0
        assert ref.mask.counts() == run.mask.counts()
        assert all(torch.equal(ref.mask.layers[n], run.mask.layers[n]) for n in ref.mask.layers)
        assert run.stats["replayed_units"] > 0 and run.stats["unet_calls"] == ref.stats["unet_calls"]
        bat = NeMo(**kw, batch_candidates=16).localize(cuda_pipe, prompt, stats)
        a = {(n, int(i)) for n, v in ref.mask.layers.items() for i in v}
        b = {(n, int(i)) for n, v in bat.mask.layers.items() for i in v}
        assert len(a & b) >= 0.9 * len(a | b), (len(a), len(b), len(a & b))
        assert bat.stats["unet_calls"] < ref.stats["unet_calls"]


def test_wanda_on_cuda_keeps_its_statistics_on_the_device_and_agrees_with_the_cpu(tiny_pipe, cuda_pipe):
    w = Wanda(**tiny_pipe.dori_method_defaults.get("wanda", {}))
    norms = w.column_norms(cuda_pipe, MEMORIZED)
    assert norms and all(v.device.type == "cuda" for v in norms.values())
    cpu, gpu = w.localize(tiny_pipe, MEMORIZED), w.localize(cuda_pipe, MEMORIZED)
    assert set(cpu.layers) == set(gpu.layers)
    both = sum(len(set(cpu.layers[n].tolist()) & set(gpu.layers[n].tolist())) for n in cpu.layers)
    # float order may swap weights tied at a row's cut-off; nothing more
    assert both >= 0.99 * max(len(cpu), len(gpu)), (both, len(cpu), len(gpu))


def test_masks_on_cuda_restore_the_model_bit_exactly(cuda_pipe, weights_hash):
    mask = Wanda(**cuda_pipe.dori_method_defaults.get("wanda", {})).localize(cuda_pipe, MEMORIZED)
    before = weights_hash(cuda_pipe.unet)
    base = generate(cuda_pipe, [MEMORIZED], seeds=[0]).images
    with apply_mask(cuda_pipe, mask):
        pruned = generate(cuda_pipe, [MEMORIZED], seeds=[0]).images
    assert weights_hash(cuda_pipe.unet) == before
    assert (pruned - base).abs().max() > 1e-3
    assert torch.equal(generate(cuda_pipe, [MEMORIZED], seeds=[0]).images, base)


def test_dori_on_cuda_optimizes_only_the_embedding(cuda_pipe, weights_hash):
    recs = [r for r in load_prompt_set("tiny") if r.memorized][:2]
    images = torch.stack([load_reference(r) for r in recs])
    before = (weights_hash(cuda_pipe.unet), weights_hash(cuda_pipe.text_encoder))
    res = DoRI(steps=10, restarts=2).attack(cuda_pipe, images, prompts=[r.caption for r in recs])
    assert (weights_hash(cuda_pipe.unet), weights_hash(cuda_pipe.text_encoder)) == before
    assert res.trigger.device.type == "cuda" and res.trigger.shape[0] == 4
    assert res.steps == 10 and len(res.loss) == 10 and min(res.distance[-1]) > 0


def test_the_recipe_trains_on_cuda(tmp_path, monkeypatch):
    import torch.nn.functional as F

    from dori.models.loading import TINY_PATH
    from dori.zoo.tiny_data import TinyDataSpec
    from dori.zoo.train_tiny import TrainConfig, build_tiny_components, train_tiny

    spec = TinyDataSpec(n_procedural=40, duplicates=3, lfw_seen_once=(0, 1, 100), lfw_held_out=(80,),
                        n_photo_crops=8)
    kw = dict(steps=6, batch_size=4, warmup=2, data=spec)
    losses, mse = [], F.mse_loss

    def spy(pred, target):  # every training step's loss
        loss = mse(pred, target)
        losses.append(float(loss))
        return loss

    monkeypatch.setattr(F, "mse_loss", spy)
    gpu = train_tiny(TrainConfig(out=str(tmp_path / "gpu"), device="cuda", **kw))
    gpu_losses, losses[:] = list(losses), []
    cpu = train_tiny(TrainConfig(out=str(tmp_path / "cpu"), **kw))
    assert json.loads((gpu / "dori_recipe.json").read_text())["device"] == "cuda"
    init = build_tiny_components(TINY_PATH / "tokenizer", seed=0)["unet"].state_dict()
    a, b = (load_pipeline(p).unet for p in (gpu, cpu))
    # the same batches, noise and timesteps: the same loss at every step, and updates that point the same
    # way (Adam turns float-order noise in tiny gradients into steps of size lr, so weights are not
    # compared directly)
    assert len(gpu_losses) == len(losses) == 6
    assert gpu_losses == pytest.approx(losses, rel=2e-2)  # another batch of 4 moves the loss by far more
    da = torch.cat([(v - init[k]).flatten() for k, v in a.state_dict().items()])
    db = torch.cat([(v - init[k]).flatten() for k, v in b.state_dict().items()])
    assert float(torch.nn.functional.cosine_similarity(da, db, dim=0)) > 0.9
