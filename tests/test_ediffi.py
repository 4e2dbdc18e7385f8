"""eDiff-I expert denoisers: the sigma switch calls exactly the expert whose interval holds sigma, the
binary-tree fine-tuning trains each node on its own timesteps from the right parent, the experts folder
round-trips through the registry, and a stopped tree continues at the node it was on. (The family's
four doors, API / CLI / server / eval, are tests/test_families.py's, which every registered family gets.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_train import HashText

import t2i
from t2i.diffusion.experts import SigmaExperts, check_intervals, sigma_interval, timestep_boundaries
from t2i.diffusion.paint_with_words import cross_attentions
from t2i.diffusion.schedules import sigmas_from_alphas_cumprod
from t2i.nets.unet import UNet
from t2i.systems import ediffi
from t2i.systems.base import GenerationRequest, UnsupportedOption, check_request
from t2i.systems.registry import resolve
from t2i.systems.shapes_ldm import ShapesLDM, write_tiny_model
from t2i.train import ediffi as tree
from t2i.train.ediffi import EDiffITrainConfig, nodes, train_ediffi, tree_levels

pytestmark = pytest.mark.usefixtures("one_thread")


class Tagged:
    """A denoiser that answers with its tag and records each sigma it was called at."""

    def __init__(self, tag: float) -> None:
        self.tag, self.calls = tag, []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        self.calls.append(torch.as_tensor(sigma).clone())
        return torch.full_like(x, self.tag) + cond["context"].reshape(-1, 1, 1, 1)


def test_the_switch_calls_exactly_the_expert_whose_interval_holds_sigma():
    experts = [Tagged(0.0), Tagged(1.0), Tagged(2.0)]
    switch = SigmaExperts(experts, [1.0, 5.0])  # [0, 1), [1, 5), [5, inf)
    x = torch.zeros(1, 1, 2, 2)
    for sigma, want in ((0.0, 0), (0.999, 0), (1.0, 1), (4.999, 1), (5.0, 2), (80.0, 2)):
        out = switch(x, torch.tensor(sigma), context=torch.zeros(1))
        assert out.unique().tolist() == [float(want)], sigma  # boundaries belong to the interval above them
    assert [len(e.calls) for e in experts] == [2, 2, 2]
    # a batch across intervals: each row from its own expert, in order, its own conditioning with it
    out = switch(torch.zeros(3, 1, 2, 2), torch.tensor([5.0, 0.5, 1.0]), context=torch.tensor([10.0, 20.0, 30.0]))
    assert out[:, 0, 0, 0].tolist() == [12.0, 20.0, 31.0]
    with pytest.raises(ValueError, match="ascending"):
        SigmaExperts(experts, [5.0, 1.0])


def test_timestep_intervals_become_sigma_boundaries_of_the_schedule():
    acp = torch.linspace(0.999, 0.01, 1000)
    sigmas = sigmas_from_alphas_cumprod(acp.double())
    assert timestep_boundaries([(0, 300), (300, 1000)], acp) == [pytest.approx(float(sigmas[300]))]
    assert sigma_interval((0, 300), acp) == (0.0, pytest.approx(float(sigmas[300])))
    assert sigma_interval((300, 1000), acp) == (pytest.approx(float(sigmas[300])), None)
    for bad in ([(0, 300), (301, 1000)], [(0, 300), (300, 999)], [(300, 1000), (0, 300)]):
        with pytest.raises(ValueError, match="tile|end at"):
            check_intervals(bad, 1000)


def test_tree_levels_halve_each_interval_and_name_parents():
    assert tree_levels(0, 1000) == [[(0, 1000)]]
    assert tree_levels(2, 1000) == [[(0, 500), (500, 1000)], [(0, 250), (250, 500), (500, 750), (750, 1000)]]
    assert nodes(2, 1000)[2:] == [((0, 250), (0, 500)), ((250, 500), (0, 500)), ((500, 750), (500, 1000)),
                                  ((750, 1000), (500, 1000))]
    assert [p for _, p in nodes(1, 1000)] == [None, None]


@pytest.fixture
def base(tmp_path) -> Path:
    return write_tiny_model(tmp_path / "base")


def _cfg(out: Path, base: Path, **kw) -> EDiffITrainConfig:
    settings = dict(out=str(out), base=str(base), depth=2, steps_per_expert=2, batch_size=4, warmup=1,
                    image_every=0, log_every=1, ckpt_every=1000, seed=3)
    return EDiffITrainConfig(**{**settings, **kw})


class Recorder:
    """Wraps train_ldm and UNet.forward: each node's config and the timesteps its U-Net trained on."""

    def __init__(self, monkeypatch, stop_at: int | None = None) -> None:
        self.runs: list[tuple[str, str, bool]] = []  # (out, init_from, resumed)
        self.seeds: list[int] = []
        self.log_every: list[int] = []  # each node run's log_every (a resumable option)
        self.timesteps: dict[str, list[torch.Tensor]] = {}
        self.stop_at, self._node = stop_at, ""
        real_train, real_forward = tree.train_ldm, UNet.forward

        def train_ldm(cfg, resume=False, **kw):
            self.runs.append((Path(cfg.out).name, cfg.init_from, resume))
            self.log_every.append(cfg.log_every)
            self.seeds.append(cfg.seed)
            self._node = Path(cfg.out).name
            if self.stop_at is not None and len(self.runs) == self.stop_at + 1:  # killed after 1 of its steps
                cfg.steps, cfg.ckpt_every = 1, 1
                real_train(cfg, resume=resume, **kw)
                return 130
            return real_train(cfg, resume=resume, **kw)

        def forward(unet, x, t, *args, **kwargs):
            if torch.is_grad_enabled():  # training steps, not the exports' or grids' sampling
                self.timesteps.setdefault(self._node, []).append(t.detach().clone())
            return real_forward(unet, x, t, *args, **kwargs)

        monkeypatch.setattr(tree, "train_ldm", train_ldm)
        monkeypatch.setattr(UNet, "forward", forward)


pipe_intervals = [(0, 250), (250, 500), (500, 750), (750, 1000)]


def test_each_node_trains_only_its_timesteps_from_its_parent_and_the_folder_round_trips(tmp_path, base,
                                                                                       monkeypatch):
    rec = Recorder(monkeypatch)
    out = tmp_path / "tree"
    assert train_ediffi(_cfg(out, base, steps_per_expert=3, batch_size=8), text_encoder=HashText()) == 0
    runs = out / "runs"
    assert rec.runs == [("t0000-0500", str(base), False), ("t0500-1000", str(base), False),
                        ("t0000-0250", str(runs / "t0000-0500" / "model.safetensors"), False),
                        ("t0250-0500", str(runs / "t0000-0500" / "model.safetensors"), False),
                        ("t0500-0750", str(runs / "t0500-1000" / "model.safetensors"), False),
                        ("t0750-1000", str(runs / "t0500-1000" / "model.safetensors"), False)]
    assert rec.seeds == [3, 4, 5, 6, 7, 8]  # every node its own stream of the world
    for name, ts in rec.timesteps.items():
        lo, hi = int(name[1:5]), int(name[6:])
        t = torch.cat(ts)
        assert len(t) == 3 * 8 and t.min() >= lo and t.max() < hi, name  # every step, every sample, in [lo, hi)
        assert t.max() - t.min() > (hi - lo) / 4  # and spread over it
    assert set(rec.timesteps) == {name for name, _, _ in rec.runs}

    # the folder: the four leaves, their intervals and sigmas in ediffi.json, loadable by the registry
    manifest = json.loads((out / "model" / "ediffi.json").read_text())
    assert [e["timesteps"] for e in manifest["experts"]] == [[0, 250], [250, 500], [500, 750], [750, 1000]]
    acp = ShapesLDM.load(base).cfg.schedule.alphas_cumprod()
    assert manifest["experts"][1]["sigmas"] == pytest.approx(list(sigma_interval((250, 500), acp)))
    assert resolve(out / "model")[0].name == "ediffi" and sorted(p.name for p in (out / "model").iterdir()) == [
        "ediffi.json", *(f"expert_t{lo:04d}-{hi:04d}.safetensors" for lo, hi in pipe_intervals)]
    pipe = t2i.load(out / "model")
    assert pipe.name == "tree"
    assert len(pipe.experts) == 4 and pipe.intervals == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    for unet, (lo, hi) in zip(pipe.experts, pipe.intervals, strict=True):
        trained = ShapesLDM.load(runs / f"t{lo:04d}-{hi:04d}" / "model.safetensors").unet.state_dict()
        assert all(torch.equal(v, trained[k]) for k, v in unet.state_dict().items())
    first, last = pipe.experts[0].state_dict(), pipe.experts[3].state_dict()
    assert any(not torch.equal(v, last[k]) for k, v in first.items())  # fine-tuned apart


def test_the_pipeline_denoises_each_step_with_its_own_expert(tmp_path):
    """Sampling touches every expert, each only at the sigmas of its interval; a pipeline of identical
    experts draws what the plain pipeline of one of them draws."""
    path = ediffi.write_tiny(tmp_path, 0)
    pipe = ediffi.load(path)
    seen: dict[int, list[float]] = {0: [], 1: []}
    hooks = [u.register_forward_pre_hook(lambda _m, a, i=i: seen[i].extend(a[1].tolist()))
             for i, u in enumerate(pipe.experts)]
    try:
        pipe.generate("a red circle", seed=0, steps=6, guidance=1.0)
    finally:
        for h in hooks:
            h.remove()
    assert seen[0] and seen[1] and max(seen[0]) < 500 <= min(seen[1])

    one = ShapesLDM.load(path / "expert_t0000-0500.safetensors")
    same = ediffi.EDiffIPipeline([one.unet, one.unet], pipe.intervals, one.vae, pipe.text_encoder,
                                 one.cfg.schedule, defaults=pipe.defaults)
    plain = one.pipeline(pipe.text_encoder)
    a, b = same.generate("a red circle", seed=0, steps=4), plain.generate("a red circle", seed=0, steps=4)
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, pipe.generate("a red circle", seed=0, steps=4).latents)


def test_options_that_wrap_one_unet_are_refused_by_name_and_regions_reach_every_expert(tmp_path):
    pipe = ediffi.load(ediffi.write_tiny(tmp_path, 0))
    for option, value in (("deepcache", 2), ("refiner_start", 0.5), ("controlnet", "x")):
        with pytest.raises(UnsupportedOption, match=option):
            check_request(pipe, GenerationRequest("a red circle", **{option: value}))
    # paint-with-words: the bias the pipeline sets on the first expert's layers is the second's too
    biased: dict[int, list[bool]] = {0: [], 1: []}
    hooks = [layer.register_forward_pre_hook(lambda m, _a, i=i: biased[i].append(m.logit_bias is not None))
             for i, u in enumerate(pipe.experts) for layer in cross_attentions(u)]
    request = GenerationRequest("a red circle", seed=0, steps=4, regions=["0,0,8,8:red circle"], region_weight=4.0)
    check_request(pipe, request)
    try:
        painted = pipe.run(request)
    finally:
        for h in hooks:
            h.remove()
    assert biased[0] and biased[1] and all(biased[0]) and all(biased[1])
    assert "Regions" in painted.images[0].info["parameters"]
    plain = pipe.run(dataclasses.replace(request, regions=None, region_weight=None))
    assert not torch.equal(painted.latents, plain.latents)
    assert all(layer.logit_bias is None for u in pipe.experts for layer in cross_attentions(u))


def test_a_stopped_tree_continues_at_the_node_it_was_on(tmp_path, base, monkeypatch):
    whole = tmp_path / "whole"
    assert train_ediffi(_cfg(whole, base, depth=1), text_encoder=HashText()) == 0

    stopped = tmp_path / "stopped"
    rec = Recorder(monkeypatch, stop_at=1)  # the second node stops after its first step
    assert train_ediffi(_cfg(stopped, base, depth=1), text_encoder=HashText()) == 130
    assert not (stopped / "model").exists()  # not a model until every expert is done
    with pytest.raises(ValueError, match="--resume"):
        train_ediffi(_cfg(stopped, base, depth=1), text_encoder=HashText())
    with pytest.raises(ValueError, match="--depth 2 differs"):
        train_ediffi(_cfg(stopped, base, depth=2), resume=True, given={"depth": "--depth"}, text_encoder=HashText())
    rec.stop_at = None
    assert train_ediffi(_cfg(stopped, base, depth=1, log_every=2), resume=True, given={"log_every": "--log-every"},
                        text_encoder=HashText()) == 0
    # an option a resume may change reaches the node it continues, and the tree's file records it
    assert rec.log_every[-1] == 2
    assert json.loads((stopped / "tree.json").read_text())["log_every"] == 2
    # the first node is not trained again; the second continues from its checkpoint
    assert [(name, resumed) for name, _, resumed in rec.runs] == [("t0000-0500", False), ("t0500-1000", False),
                                                                   ("t0500-1000", True)]
    assert "resumed from" in (stopped / "runs" / "t0500-1000" / "log.txt").read_text()
    for iv in ((0, 500), (500, 1000)):  # exactly the experts of the run that was never stopped
        a = ShapesLDM.load(whole / "model" / ediffi.expert_file_name(iv)).unet.state_dict()
        b = ShapesLDM.load(stopped / "model" / ediffi.expert_file_name(iv)).unet.state_dict()
        assert all(torch.equal(v, b[k]) for k, v in a.items()), iv


def test_cli_trains_the_tree_and_generates_from_the_folder(tmp_path, base):
    from PIL import Image

    from t2i.cli import main

    out = tmp_path / "tree"
    args = ["train", "ediffi", "--base", str(base), "--out", str(out), "--depth", "1", "--steps-per-expert", "1",
            "--batch-size", "2", "--image-every", "0", "--threads", "1"]
    assert main(args) == 0
    stamp = (out / "runs" / "t0000-0500" / "model.safetensors").stat().st_mtime_ns
    assert main(["train", "ediffi", "--out", str(out), "--resume"]) == 0  # all done: nothing is trained again
    assert (out / "runs" / "t0000-0500" / "model.safetensors").stat().st_mtime_ns == stamp
    assert main(args) == 2  # a second new tree in the same folder is refused, one line
    png = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(out / "model"), "--steps", "3", "--seed", "1",
                 "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.size == (16, 16) and "Model: tree" in im.info["parameters"]


def test_experts_with_different_autoencoders_are_refused_and_one_is_kept(tmp_path):
    from t2i.checkpoints.io import CheckpointError

    folder = ediffi.write_tiny(tmp_path)
    pipe = t2i.load(folder)
    assert pipe.capabilities.required == frozenset()  # the base's fields kept (dataclasses.replace)
    second = sorted(folder.glob("expert_*.safetensors"))[1]
    model = ShapesLDM.load(second)
    with torch.no_grad():
        next(model.vae.parameters()).add_(0.5)
    model.save(second)
    with pytest.raises(CheckpointError, match="its autoencoder differs"):
        t2i.load(folder)
