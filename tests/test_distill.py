"""Few-step distillation (issue 20): `t2i distill lcm|add`.

LCD against a transcription of Algorithm 1; a short distillation lowers the consistency loss and brings
the student's 1- and 2-step images closer to the teacher's 30-step ones than the undistilled student's;
ADD's hinge, R1 and score-distillation losses equal their definitions; resume is exact; the student ships
as a normal model with the fast defaults, `t2i generate --fast` finds it, the CLI refuses bad teachers."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import t2i
from t2i.cli import main
from t2i.distill import fast_model_file
from t2i.distill.add import (
    ADDConfig,
    FeatureDiscriminator,
    ScoreDistillation,
    distill_add,
    hinge_d_loss,
    hinge_g_loss,
    r1_penalty,
)
from t2i.distill.lcm import ConsistencyDistillation, LCMConfig, distill_lcm, predicted_x0_eps
from t2i.distill.teacher import Teacher
from t2i.nets.unet import UNet, guidance_scale_embedding
from t2i.samplers.diffusers_plan import prepare_sampling
from t2i.systems.shapes_layout import ShapesLayoutConfig, ShapesLayoutModel
from t2i.systems.shapes_ldm import UNET_PRESETS, ShapesLDM, preset_config
from t2i.train.checkpoint import checkpoint_path
from t2i.train.distributed import DistInfo

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow diamond on the left"]


@pytest.fixture(scope="module")
def text():
    from t2i.text.encoders import MiniLMTextEncoder

    return MiniLMTextEncoder.load(max_length=32)


def _tiny_ldm(folder: Path, seed: int = 0) -> Path:
    """A random tiny shapes LDM whose output convolution is scaled by 8, so its sampling visibly moves the
    latents (DESIGN.md: a random tiny U-Net barely does otherwise)."""
    torch.manual_seed(seed)
    cfg = preset_config("tiny", "tiny")
    cfg.image_size = cfg.vae.sample_size
    model = ShapesLDM(cfg)
    with torch.no_grad():
        model.unet.conv_out.weight.mul_(8)
        model.unet.conv_out.bias.mul_(8)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.safetensors")
    return folder


def _tiny_layout(folder: Path, guide_layout: bool) -> Path:
    torch.manual_seed(1)
    ldm = preset_config("tiny", "tiny")
    ldm.image_size = ldm.vae.sample_size
    model = ShapesLayoutModel(ShapesLayoutConfig(ldm=ldm, guide_layout=guide_layout))
    torch.nn.init.normal_(model.unet.layout_in.weight, std=0.1)  # the layout matters to this teacher
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.safetensors")
    return folder


def _lcm_cfg(out: Path, teacher: Path, **kw) -> LCMConfig:
    base = dict(out=str(out), teacher=str(teacher), steps=6, batch_size=4, lr=2e-3, warmup=0, image_every=0,
                ckpt_every=3, keep=10, log_every=3)
    return LCMConfig(**{**base, **kw})


# ============================================================================ LCD


def test_predicted_x0_eps_inverts_the_noising():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    acp = torch.tensor([0.9, 0.5, 0.01]).reshape(3, 1, 1, 1)
    x_t = acp.sqrt() * x0 + (1 - acp).sqrt() * eps
    outputs = {"epsilon": eps, "v_prediction": acp.sqrt() * eps - (1 - acp).sqrt() * x0, "sample": x0}
    for kind, out in outputs.items():
        got_x0, got_eps = predicted_x0_eps(out, x_t, acp, kind)
        torch.testing.assert_close(got_x0, x0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_eps, eps, atol=1e-4, rtol=1e-4)


def _algorithm_1(student, target, teacher, x0, cond, uncond, acp, k, g_range, huber_c, seed) -> torch.Tensor:
    """Luo et al. 2023 Algorithm 1 (LCD) for one batch of v-prediction networks, written out per example in the
    paper's form: the guided solver step z + (1 + w) Phi(z, c) - w Phi(z, {}), Phi the DDIM increment; the
    consistency function c_skip z + c_out x0 with LCMScheduler's scalings (sigma_data 0.5, t scaled by 10); the
    pseudo-Huber distance. Draws: n, then eps, then w, as the implementation documents."""
    b, T = x0.shape[0], acp.shape[0]
    gen = torch.Generator().manual_seed(seed)
    n = torch.randint(0, T // k, (b,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    w = g_range[0] - 1 + (g_range[1] - g_range[0]) * torch.rand(b, generator=gen)

    def x0_of(v, z, t):
        return acp[t].sqrt() * z - (1 - acp[t]).sqrt() * v

    def eps_of(v, z, t):
        return acp[t].sqrt() * v + (1 - acp[t]).sqrt() * z

    def f(net, z, t, c, wi):
        scaled = 10.0 * t
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
        emb = guidance_scale_embedding(wi.reshape(1), 256)
        return c_skip * z + c_out * x0_of(net(z, torch.tensor([float(t)]), context=c, timestep_cond=emb), z, t)

    total = 0.0
    for i in range(b):
        t_hi = int((n[i] + 1) * k - 1)  # t_{n+k}
        t_lo = max(t_hi - k, 0)  # t_n
        z = acp[t_hi].sqrt() * x0[i:i + 1] + (1 - acp[t_hi]).sqrt() * eps[i:i + 1]

        def phi(c, z=z, t_hi=t_hi, t_lo=t_lo):
            v = teacher(z, torch.tensor([float(t_hi)]), context=c)
            return acp[t_lo].sqrt() * x0_of(v, z, t_hi) + (1 - acp[t_lo]).sqrt() * eps_of(v, z, t_hi) - z

        z_prev = z + (1 + w[i]) * phi(cond[i:i + 1]) - w[i] * phi(uncond[i:i + 1])
        pred = f(student, z, t_hi, cond[i:i + 1], w[i])
        tgt = f(target, z_prev, t_lo, cond[i:i + 1], w[i])
        total = total + ((((pred - tgt) ** 2 + huber_c**2).sqrt() - huber_c).mean())
    return total / b


def test_lcd_loss_is_a_transcription_of_algorithm_1():
    torch.manual_seed(0)
    teacher = UNet(UNET_PRESETS["tiny"]).eval()
    with torch.no_grad():
        teacher.conv_out.weight.mul_(8)
    student = UNet(dataclasses.replace(UNET_PRESETS["tiny"], time_cond_proj_dim=256))
    target = copy.deepcopy(student)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0 = torch.randn(3, 4, 4, 4)
    cond, uncond = torch.randn(3, 5, 384), torch.randn(3, 5, 384) * 0.1
    acp = preset_config().schedule.alphas_cumprod()
    lcd = ConsistencyDistillation(acp, "v_prediction", skip=100, guidance=(1.5, 6.0), huber_c=0.01, embed_dim=256)
    got = lcd(student, target, teacher, x0, {"context": cond}, {"context": uncond}, torch.Generator().manual_seed(7))
    want = _algorithm_1(student, target, teacher, x0, cond, uncond, acp, 100, (1.5, 6.0), 0.01, seed=7)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert got > 1e-3  # the three networks differ: a loss that vanished would compare nothing


def test_bad_distillation_settings_are_refused():
    acp = preset_config().schedule.alphas_cumprod()
    for kw, match in ((dict(skip=7), "must divide"), (dict(skip=600), "at least two"),
                      (dict(guidance=(3.0, 2.0)), "min <= max"), (dict(loss="l1"), "huber or l2")):
        with pytest.raises(ValueError, match=match):
            ConsistencyDistillation(acp, "v_prediction", **kw)


def test_the_lcd_grid_holds_every_timestep_the_lcm_sampler_visits():
    schedule = preset_config().schedule
    grid = set(ConsistencyDistillation(schedule.alphas_cumprod(), "v_prediction").grid.tolist())
    for steps in (1, 2, 4, 8):
        assert set(prepare_sampling(schedule, "lcm", steps).timesteps.long().tolist()) <= grid


# ============================================================================ a short LCM run


@pytest.fixture(scope="module")
def lcm_run(tmp_path_factory, text):
    root = tmp_path_factory.mktemp("lcm")
    teacher = _tiny_ldm(root / "teacher")
    cfg = _lcm_cfg(root / "run", teacher, steps=100, batch_size=8, ckpt_every=1000, log_every=20)
    assert distill_lcm(cfg, text_encoder=text) == 0
    return teacher, root / "run"


def test_distilled_student_ships_as_a_normal_model_with_the_fast_defaults(lcm_run):
    import t2i

    _, run = lcm_run
    model = ShapesLDM.load(run / "model.safetensors")
    assert (model.cfg.sampler, model.cfg.steps, model.cfg.guidance) == ("lcm", 4, 4.0)  # the teacher's guidance
    assert model.cfg.unet.time_cond_proj_dim == 256
    pipe = t2i.load(run)
    assert pipe.family == "shapes_ldm" and pipe.embeds_guidance
    image = pipe("a red circle", seed=0)[0]
    assert "Sampler: LCM" in image.info["parameters"] and "Steps: 4" in image.info["parameters"]


def _lcd_on_fixed_draws(teacher_dir: Path, unet: torch.nn.Module, text) -> float:
    """The LCD loss (target: the student itself) of 32 fixed data items and draws."""
    teacher = Teacher(str(teacher_dir), text)
    lcd = ConsistencyDistillation(teacher.schedule.alphas_cumprod(), "v_prediction", guidance=(1.0, 7.0),
                                  embed_dim=256)
    gen = torch.Generator().manual_seed(99)
    b = teacher.encode(*teacher.data(12345, None, print)(0, 32, DistInfo()), gen)
    with torch.no_grad():
        return lcd(unet, unet, teacher.unet, b.z, b.cond, b.uncond, gen).item()


def test_distillation_lowers_the_consistency_loss(lcm_run, text):
    teacher_dir, run = lcm_run
    before = Teacher(str(teacher_dir), text).student_unet(embed_guidance=True).eval()
    after = ShapesLDM.load(run / "model.safetensors").unet
    start, end = _lcd_on_fixed_draws(teacher_dir, before, text), _lcd_on_fixed_draws(teacher_dir, after, text)
    assert end < 0.7 * start, (start, end)


def test_distilled_student_few_steps_are_closer_to_the_teachers_many_steps(lcm_run, text):
    """Per seed, a consistency model's one step lands on the teacher's ODE solution from the same noise; the
    multistep sampler re-noises with fresh noise, so its samples drift to other solutions (measured: at 4
    steps neither student is close). 1 and 2 steps: closer than the undistilled student (the teacher's
    weights, whose zero-initialised guidance input changes nothing) by a clear margin."""
    teacher_dir, run = lcm_run
    teacher = ShapesLDM.load(teacher_dir / "model.safetensors").pipeline(text)
    student = ShapesLDM.load(run / "model.safetensors").pipeline(text)

    def latents(pipe, **kw):
        return torch.cat([pipe.generate(p, seed=s, **kw).latents for p in PROMPTS for s in range(3)])

    ref = latents(teacher, steps=30, sampler="ddim", guidance=4.0)
    for steps in (1, 2):
        undistilled = ((latents(teacher, steps=steps, sampler="lcm", guidance=1.0) - ref) ** 2).mean()
        distilled = ((latents(student, steps=steps, guidance=4.0) - ref) ** 2).mean()
        # measured 0.81, 0.73 of it on a Zen 4; 0.87 at 1 step on an AVX2-only Zen 3 (same code, other float paths)
        assert distilled < 0.9 * undistilled, (steps, distilled, undistilled)


def test_generate_fast_uses_the_student_beside_the_model(lcm_run, tmp_path):
    teacher_dir, run = lcm_run
    model = tmp_path / "model"
    shutil.copytree(teacher_dir, model)
    with pytest.raises(FileNotFoundError, match="model.fast.safetensors"):
        fast_model_file(model)
    assert main(["generate", "x", "--model", str(model), "--fast", "--out", str(tmp_path / "a.png")]) == 2
    shutil.copyfile(run / "model.safetensors", model / "model.fast.safetensors")
    assert fast_model_file(model) == model / "model.fast.safetensors"
    assert fast_model_file(model / "model.fast.safetensors") == model / "model.fast.safetensors"
    assert main(["generate", "a red circle", "--model", str(model), "--fast", "--seed", "3", "--quiet",
                 "--out", str(tmp_path / "b.png")]) == 0
    params = Image.open(tmp_path / "b.png").info["parameters"]
    assert "Sampler: LCM" in params and "Steps: 4" in params and "CFG scale: 4.0" in params


def test_fast_is_the_model_itself_when_its_defaults_already_are_lcm(lcm_run, tmp_path):
    """The built-in model samples with lcm at 4 steps by default, measured as its fastest setting that keeps
    the score: --fast uses it as it is; a model with another default sampler and no student is refused."""
    from t2i.distill import load_fast, resolve_fast

    teacher_dir, run = lcm_run
    loads = []

    def load(m):
        loads.append(m)
        return t2i.load(m)

    student_only = tmp_path / "student"  # a distilled model (defaults lcm) with no student beside it
    shutil.copytree(run, student_only)
    assert resolve_fast(student_only, load).defaults.sampler == "lcm" and loads[-1] == student_only
    with pytest.raises(FileNotFoundError, match="model.fast.safetensors"):
        resolve_fast(teacher_dir, load)  # its defaults are not lcm
    builtin = load_fast("t2i-shapes-layout")
    assert (builtin.defaults.sampler, builtin.defaults.steps, builtin.defaults.guidance) == ("lcm", 4, 1.0)


# ============================================================================ resume, LCM-LoRA, layouts, CLI


def _final_state(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(checkpoint_path(out, step))


@pytest.mark.parametrize("method", ["lcm", "add"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, text, method):
    teacher = _tiny_layout(tmp_path / "teacher", guide_layout=True) if method == "add" else _tiny_ldm(tmp_path / "t")
    if method == "lcm":
        def make(out: Path, steps: int) -> LCMConfig:
            return _lcm_cfg(out, teacher, steps=steps)

        run = distill_lcm
    else:
        def make(out: Path, steps: int) -> ADDConfig:
            return ADDConfig(out=str(out), teacher=str(teacher), steps=steps, batch_size=4, image_every=0,
                             ckpt_every=3, keep=10, log_every=3)

        run = distill_add
    assert run(make(tmp_path / "full", 6), text_encoder=text) == 0
    assert run(make(tmp_path / "part", 3), text_encoder=text) == 0
    assert run(make(tmp_path / "part", 6), resume=True, text_encoder=text) == 0
    full, resumed = _final_state(tmp_path / "full", 6), _final_state(tmp_path / "part", 6)
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0, msg=key)
    first = _final_state(tmp_path / "part", 3)
    assert any(not torch.equal(first[k], full[k]) for k in full if k.startswith("student."))


def test_layout_teacher_guides_against_no_caption_and_no_layout(tmp_path, text):
    for guide_layout in (True, False):
        teacher = Teacher(str(_tiny_layout(tmp_path / str(guide_layout), guide_layout)), text)
        data = teacher.data(0, None, print)
        b = teacher.encode(*data(0, 3, DistInfo()), torch.Generator().manual_seed(0))
        assert b.z.shape == (3, 4, 4, 4) and b.cond["layout"][:, 0, 4].eq(1).all()  # every scene has an object
        assert b.uncond["layout"].eq(0).all() == guide_layout
        torch.testing.assert_close(b.uncond["context"], teacher.text.encode([""] * 3).context)


def test_lcm_lora_writes_an_adapter_and_its_merged_model(tmp_path, text):
    import t2i
    from t2i.adapters.lora import apply_loras, read_lora

    teacher = _tiny_ldm(tmp_path / "teacher")
    assert distill_lcm(_lcm_cfg(tmp_path / "run", teacher, lora=True, steps=4, rank=4, lr=1e-2),
                       text_encoder=text) == 0
    layers, extra = read_lora(tmp_path / "run" / "lcm_lora.safetensors")
    assert not extra and any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in layers)
    merged = t2i.load(tmp_path / "run")
    assert (merged.defaults.sampler, merged.defaults.steps, merged.defaults.guidance) == ("lcm", 4, 1.0)
    assert not merged.embeds_guidance
    base = t2i.load(teacher)
    x, t, ctx = torch.randn(2, 4, 4, 4), torch.tensor([999.0, 259.0]), torch.randn(2, 6, 384)
    with torch.no_grad():
        plain = base.unet(x, t, ctx)
        with apply_loras(base, [(tmp_path / "run" / "lcm_lora.safetensors", 1.0)]):
            torch.testing.assert_close(base.unet(x, t, ctx), merged.unet(x, t, ctx), rtol=1e-4, atol=1e-5)
    assert (merged.unet(x, t, ctx) - plain).abs().max() > 1e-4  # the adapter learned something


def test_distill_cli_runs_and_refuses_what_is_not_a_teacher(tmp_path, capsys):
    teacher = _tiny_ldm(tmp_path / "teacher")
    assert main(["distill", "lcm", "--teacher", str(teacher), "--out", str(tmp_path / "run"), "--steps", "2",
                 "--batch-size", "2", "--threads", "1"]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert main(["generate", "a red circle", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "x.png"),
                 "--seed", "0", "--quiet"]) == 0
    from t2i.distill.speed import main as speed

    capsys.readouterr()
    speed([str(tmp_path / "run"), "--images", "2", "--steps", "1"])
    assert "{'steps': 1}" in (line := capsys.readouterr().out) and float(line.split(": ")[-1].split()[0]) > 0
    from t2i.systems.ddpm import SYSTEM as DDPM

    pixel = DDPM.write_tiny(tmp_path / "ddpm", 0).parent
    capsys.readouterr()
    assert main(["distill", "add", "--teacher", str(pixel), "--out", str(tmp_path / "bad")]) == 2
    assert "not a latent diffusion model" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["distill", "lcm", "--teacher", str(teacher), "--out", str(tmp_path / "bad2"), "--skip", "7"]) == 2
    assert "--skip 7" in capsys.readouterr().err
    assert main(["distill", "lcm", "--out", str(tmp_path / "bad3")]) == 2
    assert "--teacher is required" in capsys.readouterr().err


# ============================================================================ ADD


def test_hinge_losses_equal_their_definitions():
    real = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.5, 0.2]])  # (K heads, B)
    fake = torch.tensor([[-2.0, 0.5, 1.0], [-0.5, -1.5, 3.0]])
    want_d = sum(sum(max(0.0, 1 - r) for r in row) / 3 for row in real.tolist()) \
        + sum(sum(max(0.0, 1 + f) for f in row) / 3 for row in fake.tolist())
    assert hinge_d_loss(real, fake).item() == pytest.approx(want_d)
    assert hinge_g_loss(fake).item() == pytest.approx(-sum(sum(row) / 3 for row in fake.tolist()))


def test_r1_penalty_equals_its_definition():
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    a = torch.randn(3, 2, 2)
    logits = torch.stack([(x * a).sum((1, 2, 3)), (x**2).sum((1, 2, 3))])  # (K = 2, B): grad a + 2x
    want = ((a + 2 * x) ** 2).flatten(1).sum(1).mean()
    got = r1_penalty(logits, x)
    torch.testing.assert_close(got, want)
    (grad,) = torch.autograd.grad(got, x)  # differentiable, as the discriminator's update needs
    torch.testing.assert_close(grad, 2 * (a + 2 * x) * 2 / 4)  # d/dx mean_b ||a + 2x||^2


def test_score_distillation_equals_its_definition():
    torch.manual_seed(0)
    teacher = UNet(UNET_PRESETS["tiny"]).eval()
    acp = preset_config().schedule.alphas_cumprod()
    x0 = torch.randn(2, 4, 4, 4, requires_grad=True)
    cond, uncond = {"context": torch.randn(2, 3, 384)}, {"context": torch.zeros(2, 3, 384)}
    t, noise = torch.tensor([10, 900]), torch.randn(2, 4, 4, 4)
    loss = ScoreDistillation(acp, "v_prediction", 3.0)(teacher, x0, t, noise, cond, uncond)
    want = 0.0
    with torch.no_grad():
        for i in range(2):
            a, s = acp[t[i]].sqrt(), (1 - acp[t[i]]).sqrt()
            x_t = a * x0[i:i + 1] + s * noise[i:i + 1]
            x0s = [a * x_t - s * teacher(x_t, t[i:i + 1].float(), c["context"][i:i + 1]) for c in (uncond, cond)]
            psi = x0s[0] + 3.0 * (x0s[1] - x0s[0])
            want += a * ((x0[i:i + 1] - psi) ** 2).mean() / 2
    torch.testing.assert_close(loss, want)
    (grad,) = torch.autograd.grad(loss, x0)
    assert grad.abs().sum() > 0  # the gradient reaches the student's output, not the teacher


def test_discriminator_reads_the_frozen_unets_levels_and_passes_gradients():
    torch.manual_seed(0)
    unet = UNet(UNET_PRESETS["tiny"]).requires_grad_(False).eval()
    disc = FeatureDiscriminator(unet, 384, dim=8)
    assert [n for n, _ in disc.named_parameters()] == [n for n, _ in disc.heads.named_parameters(prefix="heads")]
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    t, cond = torch.tensor([5, 50]), {"context": torch.randn(2, 3, 384)}
    feats = disc.features(x, t, cond)
    emb = unet.embed_time(t.float(), 2, x.dtype)
    h, skips = unet.encode(x, emb, cond["context"])
    torch.testing.assert_close(feats[0], skips[1])  # level 0 before its Downsample
    torch.testing.assert_close(feats[1], h)
    torch.testing.assert_close(feats[2], unet.mid_block(h, emb, cond["context"]))
    logits = disc(x, t, cond, torch.randn(2, 384))
    assert logits.shape == (3, 2)
    (grad,) = torch.autograd.grad(logits.sum(), x)
    assert grad.abs().sum() > 0
    assert not any(m._forward_hooks for m in unet.modules())  # the U-Net is left as it was
    twice = disc(x, t, cond, text := torch.randn(2, 384), double_backward=True)  # R1's path: the explicit attention
    torch.testing.assert_close(twice, disc(x, t, cond, text), rtol=1e-4, atol=1e-5)
    r1_penalty(twice, x).backward()  # the fused kernel has no double backward: this raised before
    assert disc.heads[0].body[0].weight.grad.abs().sum() > 0 and disc.heads[2].cond.weight.grad.abs().sum() > 0
    assert all(m.logit_bias is None for m in unet.modules() if hasattr(m, "logit_bias"))


def test_add_student_trains_at_the_lcm_sampler_timesteps_and_ships_without_guidance(tmp_path, text):
    import t2i

    teacher = _tiny_layout(tmp_path / "teacher", guide_layout=True)  # no planner: the grid draws captions only
    cfg = ADDConfig(out=str(tmp_path / "run"), teacher=str(teacher), steps=3, batch_size=2, image_every=3,
                    ckpt_every=3, log_every=1)
    assert distill_add(cfg, text_encoder=text) == 0
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "student timesteps [999, 759, 499, 259]" in log and "add/r1=" in log
    pipe = t2i.load(tmp_path / "run")
    assert pipe.family == "shapes_layout" and not pipe.embeds_guidance
    assert (pipe.defaults.sampler, pipe.defaults.steps, pipe.defaults.guidance) == ("lcm", 4, 1.0)
    assert list((tmp_path / "run" / "samples").glob("student_*.png"))
