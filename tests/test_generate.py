import pytest
import torch

from dori.errors import DoriError
from dori.models.generate import encode_prompts, generate, predict_noise, to_epsilon, training_target

CAPS = ["a red circle on a blue background", "chelsea the orange tabby cat looking up"]


def test_shapes_order_and_range(tiny_pipe):
    out = generate(tiny_pipe, CAPS, seeds=[3, 4], num_inference_steps=4)
    assert out.images.shape == (4, 3, 32, 32)
    assert out.prompt_index == [0, 0, 1, 1] and out.seeds == [3, 4, 3, 4]
    assert 0 <= out.images.min() and out.images.max() <= 1


def test_sample_depends_only_on_prompt_and_seed(tiny_pipe):
    a = generate(tiny_pipe, CAPS, seeds=[3, 4], num_inference_steps=4, batch_size=4).images
    b = generate(tiny_pipe, CAPS[1:], seeds=[4], num_inference_steps=4, batch_size=1).images
    torch.testing.assert_close(a[3], b[0], rtol=0, atol=1e-5)
    c = generate(tiny_pipe, CAPS[1:], seeds=[5], num_inference_steps=4).images
    assert (c[0] - b[0]).abs().max() > 0.05


def test_prompt_embeds_path_equals_prompt_path(tiny_pipe):
    e = encode_prompts(tiny_pipe, CAPS)
    assert e.shape == (2, 77, tiny_pipe.text_encoder.config.hidden_size)
    a = generate(tiny_pipe, CAPS, seeds=[0], num_inference_steps=3).images
    b = generate(tiny_pipe, prompt_embeds=e, seeds=[0], num_inference_steps=3).images
    torch.testing.assert_close(a, b)


def test_noise_predictions_for_detectors(tiny_pipe):
    out = generate(tiny_pipe, CAPS, seeds=[0, 1], num_inference_steps=10, stop_after=2, return_noise_preds=True,
                   with_uncond=True)  # as detectors ask (needed at guidance 1)
    assert out.images is None and len(out.noise_preds) == 2 and len(out.timesteps) == 2
    assert out.noise_preds[0].shape == (2, 4, 3, 32, 32)  # (uncond, cond) x samples
    uncond, cond = out.noise_preds[0]
    assert (cond - uncond).norm() > 0


def test_guidance_one_samples_the_conditional_prediction_and_can_still_report_both(tiny_pipe):
    plain = generate(tiny_pipe, CAPS[:1], seeds=[0], num_inference_steps=3, guidance_scale=1.0)
    skipped = generate(tiny_pipe, CAPS[:1], seeds=[0], num_inference_steps=3, guidance_scale=1.0,
                       return_noise_preds=True)
    traced = generate(tiny_pipe, CAPS[:1], seeds=[0], num_inference_steps=3, guidance_scale=1.0,
                      return_noise_preds=True, with_uncond=True)
    guided = generate(tiny_pipe, CAPS[:1], seeds=[0], num_inference_steps=3, guidance_scale=2.0)
    # by default guidance 1 skips the unconditional prediction (NeMo's signal needs only the conditional)
    assert torch.equal(skipped.noise_preds[0][0], skipped.noise_preds[0][1])
    # the trajectory is unguided whether or not the unconditional prediction is computed ...
    assert torch.allclose(plain.images, traced.images, atol=1e-5)
    assert not torch.allclose(plain.images, guided.images, atol=1e-3)
    # ... and a detector still gets the unconditional prediction (Wen et al.'s magnitude is not zero)
    uncond, cond = traced.noise_preds[0]
    assert (cond - uncond).norm() > 0


@pytest.mark.parametrize("rescale", [0.0, 0.5])
def test_the_loop_samples_what_the_diffusers_pipeline_samples(tiny_pipe, rescale):
    """The one generation loop and diffusers' own StableDiffusionPipeline.__call__ give the same image
    for the same starting noise, with and without guidance rescale (the tiny model's default is 0.5)."""
    from dori.models.generate import initial_noise

    # a memorized caption: guidance pulls hard, so rescale visibly changes the sample (on "a red circle on
    # a blue background", a caption style this model was not trained on, it moved no pixel by 1e-2)
    caption = CAPS[1]

    ours = generate(tiny_pipe, [caption], seeds=[7], num_inference_steps=4, guidance_scale=2.0,
                    guidance_rescale=rescale).images
    theirs = tiny_pipe(caption, num_inference_steps=4, guidance_scale=2.0, guidance_rescale=rescale,
                       latents=initial_noise(tiny_pipe, [7]), height=32, width=32, output_type="pt").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    if rescale:  # and the rescale changes the sample (guarding against an option silently ignored)
        plain = generate(tiny_pipe, [caption], seeds=[7], num_inference_steps=4, guidance_scale=2.0,
                         guidance_rescale=0.0).images
        assert (plain - ours).abs().max() > 1e-2
        # the model's own default (dori_defaults.json: 0.5) is what generate() uses when not told
        default = generate(tiny_pipe, [caption], seeds=[7], num_inference_steps=4, guidance_scale=2.0).images
        torch.testing.assert_close(default, ours)


def test_guidance_rescale_outside_0_1_is_one_clear_error(tiny_pipe):
    with pytest.raises(DoriError, match="guidance_rescale must lie in"):
        generate(tiny_pipe, CAPS[:1], seeds=[0], num_inference_steps=2, guidance_rescale=1.5)


def test_differentiable_path_reaches_the_embedding(tiny_pipe):
    e = encode_prompts(tiny_pipe, CAPS[:1]).requires_grad_(True)
    x = torch.randn(1, 3, 32, 32)
    predict_noise(tiny_pipe, x, 500, e).pow(2).mean().backward()
    assert e.grad is not None and e.grad.abs().sum() > 0
    e2 = encode_prompts(tiny_pipe, CAPS[:1]).requires_grad_(True)
    out = generate(tiny_pipe, prompt_embeds=e2, seeds=[0], num_inference_steps=2, grad=True)
    out.images.mean().backward()
    assert e2.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())


def test_needs_exactly_one_input(tiny_pipe):
    with pytest.raises(DoriError):
        generate(tiny_pipe)


def test_requests_share_batches_and_give_each_its_rows(tiny_pipe, tmp_path):
    """Several requests (e.g. every budget of an attack) evaluated in shared UNet batches give the rows
    that evaluating each alone gives."""
    from dori import load_prompt_set
    from dori.analyses.replication import EvalRequest, evaluate_replication, evaluate_requests
    from dori.metrics.pixel import PixelSSIM
    from dori.models.generate import encode_prompts

    recs = [r for r in load_prompt_set("tiny") if r.kind == "memorized"][:2]
    e = encode_prompts(tiny_pipe, [r.caption for r in recs])
    moved = {recs[0].caption: e[1], recs[1].caption: e[0]}  # each caption generated from the other's embedding
    metric, gen = PixelSSIM(), dict(num_inference_steps=5)
    reqs = [EvalRequest(recs), EvalRequest(recs, "bypass", "x+dori", 3, moved, {"attack": "dori"})]
    together = evaluate_requests(tiny_pipe, reqs, [0], metric, tmp_path / "a", gen_kwargs=gen)
    alone = [evaluate_replication(tiny_pipe, recs, [0], metric, tmp_path / "b", gen_kwargs=gen),
             evaluate_replication(tiny_pipe, recs, [0], metric, tmp_path / "b", stage="bypass", setting="x+dori",
                                  budget=3, embeds=moved, item_extra={"attack": "dori"}, gen_kwargs=gen)]
    for t, a in zip(together, alone, strict=True):
        assert [(r["stage"], r["setting"], r["budget"], r["caption"], r.get("attack")) for r in t] == \
            [(r["stage"], r["setting"], r["budget"], r["caption"], r.get("attack")) for r in a]
        assert [r["score"] for r in t] == pytest.approx([r["score"] for r in a], abs=1e-6)
    assert together[1][0]["score"] < together[0][0]["score"] - 0.3  # the other photo, not this caption's


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_convert_to_the_noise(kind):
    """An exact prediction in any parameterization converts back to the exact noise (per-sample t)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand((3, 3, 8, 8), generator=g) * 2 - 1, torch.randn((3, 3, 8, 8), generator=g)
    t = torch.tensor([5, 500, 990])
    x_t = sched.add_noise(x0, eps, t)
    target = training_target(sched, x0, eps, t)
    torch.testing.assert_close(to_epsilon(sched, target, x_t, t), eps, rtol=1e-4, atol=1e-4)
    if kind == "v_prediction":
        torch.testing.assert_close(target, sched.get_velocity(x0, eps, t))
    sched.set_timesteps(50)
    step = sched.step(target[2:], int(t[2]), x_t[2:])  # diffusers reads the same parameterization
    torch.testing.assert_close(step.pred_original_sample, x0[2:], rtol=1e-3, atol=1e-3)


def test_unknown_prediction_type_is_refused():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler()
    sched.register_to_config(prediction_type="flow")
    with pytest.raises(DoriError, match="prediction_type"):
        to_epsilon(sched, torch.zeros(1), torch.zeros(1), 5)


def test_a_prompt_without_reference_replicates_any_reference_over_its_own_threshold(tiny_pipe, tmp_path):
    """An unseen caption is checked against every reference with that reference's own threshold: it
    replicates a reference it beats even when a nearer reference has a threshold it does not beat."""
    from dori import load_prompt_set
    from dori.analyses.replication import EvalRequest, evaluate_requests
    from dori.data.prompts import load_reference
    from dori.metrics.pixel import PixelSSIM

    recs = load_prompt_set("tiny")
    recs = [r for r in recs if r.kind == "memorized"][:3] + [r for r in recs if r.kind == "unseen"][:1]
    gen = dict(num_inference_steps=3)
    plain = evaluate_requests(tiny_pipe, [EvalRequest(recs)], [0], PixelSSIM(), tmp_path / "a", gen_kwargs=gen)[0]
    unseen = plain[-1]
    assert unseen["reference"] is None and not unseen["replicated"]  # 3 denoising steps copy nothing
    assert unseen["score_reference"] == unseen["nearest_reference"]
    near = next(load_reference(rec) for rec, row in zip(recs, plain, strict=True)
                if row["reference"] == unseen["nearest_reference"])

    class NearestUnreachable(PixelSSIM):
        def threshold_for(self, reference, size=32):
            return 2.0 if torch.equal(reference, near) else -1.0  # SSIM lies in [-1, 1]: the others pass

    row = evaluate_requests(tiny_pipe, [EvalRequest(recs)], [0], NearestUnreachable(), tmp_path / "b",
                            gen_kwargs=gen)[0][-1]
    assert row["nearest_reference"] == unseen["nearest_reference"]
    assert row["replicated"] and row["threshold"] == -1.0
    assert row["score_reference"] not in (None, unseen["nearest_reference"])
    assert row["score"] < row["nearest_score"]  # a farther reference, the only kind it beats
