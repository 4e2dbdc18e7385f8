"""`t2i serve --lora-dir` (issue 21): A1111's `<lora:name:w>` prompt tags through the A1111, OpenAI and
job APIs merge that LoRA for the request's run only (the same image as `apply_loras` + run in
Python, the base model's image bit-exactly right after), jobs with different LoRA sets are never
batched together, an unknown name is a 422 naming the tag before anything is queued, and
`/sdapi/v1/loras` / `/sdapi/v1/embeddings` list the folders as A1111 does.
Tiny random SD1-like model, 16 px, 2 steps; LoRAs written by test_lora's kohya writer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")

from sd_oracles import build_sd1  # noqa: E402
from test_embeddings import write_a1111  # noqa: E402
from test_lora import write_kohya_lora  # noqa: E402
from test_serve import png, request, serve, wait_for  # noqa: E402

import t2i  # noqa: E402
from t2i.adapters.lora import apply_loras  # noqa: E402
from t2i.imageio import parse_parameters  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(steps=2, width=16, height=16, sampler="euler", guidance=5.0)
A1111 = {"steps": 2, "width": 16, "height": 16, "sampler_name": "Euler", "cfg_scale": 5.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(pipe, LoRA folder, {name: file}): `ink` at the top, `wash` in a subfolder (A1111 searches them)."""
    root = tmp_path_factory.mktemp("serve_lora")
    ref = build_sd1(root / "sd1")
    loras = root / "loras"
    (loras / "styles").mkdir(parents=True)
    files = {"ink": write_kohya_lora(ref, "sd1", loras / "ink.safetensors", seed=0),
             "wash": write_kohya_lora(ref, "sd1", loras / "styles" / "wash.safetensors", seed=5)}
    return t2i.load(root / "sd1"), loras, files


def pixels(b64: str) -> np.ndarray:
    return np.asarray(png(b64), dtype=int)


def reference(pipe, prompt: str, seed: int, loras=()) -> np.ndarray:
    """The Python API's image: `apply_loras` around a run on the prompt without its tags."""
    with apply_loras(pipe, loras):
        return np.asarray(pipe.generate(prompt, seed=seed, **SETTINGS).images[0], dtype=int)


def weights(pipe) -> dict[str, torch.Tensor]:
    nets = {"unet": pipe.unet, "text": pipe.text_encoder}
    return {f"{n}.{k}": v.clone() for n, net in nets.items() for k, v in net.state_dict().items()}


def test_tagged_request_merges_its_lora_for_its_run_only(setup):
    pipe, loras, files = setup
    base_weights = weights(pipe)
    base = reference(pipe, "a red circle ", 3)
    inked = reference(pipe, "a red circle ", 3, [(files["ink"], 0.6)])
    assert np.abs(inked - base).max() > 8  # the LoRA changes the image: the comparisons below can fail
    tagged = "a red circle <lora:ink:0.6>"
    with serve(pipe, lora_dir=str(loras)) as s:
        code, _, a1111 = request("POST", s.url + "/sdapi/v1/txt2img", {**A1111, "prompt": tagged, "seed": 3})
        assert code == 200
        assert np.array_equal(pixels(a1111["images"][0]), inked)
        assert parse_parameters(png(a1111["images"][0]).info["parameters"])["prompt"] == tagged  # A1111 keeps it
        # Unmerged right after: the weights bit for bit, and an untagged request gets the base image.
        assert all(torch.equal(v, base_weights[k]) for k, v in weights(pipe).items())
        code, _, plain = request("POST", s.url + "/sdapi/v1/txt2img", {**A1111, "prompt": "a red circle ", "seed": 3})
        assert code == 200 and np.array_equal(pixels(plain["images"][0]), base)

        # The OpenAI and job APIs read the same tag.
        code, _, openai = request("POST", s.url + "/v1/images/generations", {
            "prompt": tagged, "size": "16x16", "response_format": "b64_json", "seed": 3, "steps": 2,
            "guidance": 5.0, "sampler": "euler"})
        assert code == 200 and np.array_equal(pixels(openai["data"][0]["b64_json"]), inked)
        code, _, job = request("POST", s.url + "/v1/jobs", {"prompt": tagged, "seed": 3, "steps": 2, "width": 16,
                                                             "height": 16, "guidance": 5.0, "sampler": "euler"})
        assert code == 202
        done = wait_for(lambda: (j := request("GET", s.url + f"/v1/jobs/{job['id']}")[2])["status"] == "done" and j,
                        what="the job")
        assert np.array_equal(pixels(done["images"][0]["b64_json"]), inked)
        assert done["images"][0]["parameters"].startswith(tagged + "\n")
    assert all(torch.equal(v, base_weights[k]) for k, v in weights(pipe).items())


def test_jobs_with_different_loras_are_not_batched_together(setup):
    pipe, loras, files = setup
    jobs = {11: ("a circle <lora:ink:0.6>", [(files["ink"], 0.6)]),
            12: ("a circle <lora:ink:0.6>", [(files["ink"], 0.6)]),
            13: ("a circle <lora:wash:-0.8>", [(files["wash"], -0.8)]),
            14: ("a circle ", [])}
    with serve(pipe, lora_dir=str(loras), max_batch=4, batch_wait=1.0) as s, ThreadPoolExecutor(4) as pool:
        futures = {sd: pool.submit(request, "POST", s.url + "/sdapi/v1/txt2img", {**A1111, "prompt": p, "seed": sd})
                   for sd, (p, _) in jobs.items()}
        answers = {sd: f.result(timeout=120) for sd, f in futures.items()}
        assert all(code == 200 for code, _, _ in answers.values())
        assert s.queue.batches == 3  # the two ink jobs as one call; wash and the untagged job each alone
    for sd, (prompt, merged) in jobs.items():
        got = pixels(answers[sd][2]["images"][0])
        expected = reference(pipe, prompt.split("<")[0], sd, merged)
        # The ink pair ran batched: CPU kernels are not batch-invariant, at most one 8-bit level apart.
        assert np.abs(got - expected).max() <= (1 if sd in (11, 12) else 0), sd


def test_unknown_lora_or_no_lora_dir_is_a_422_naming_the_tag(setup):
    pipe, loras, _ = setup
    with serve(pipe, lora_dir=str(loras)) as s:
        for path, body in (("/sdapi/v1/txt2img", {**A1111, "prompt": "x <lora:nope:0.5>"}),
                           ("/v1/images/generations", {"prompt": "x <lora:nope:0.5>", "size": "16x16"}),
                           ("/v1/jobs", {"prompt": "x <lora:nope:0.5>", "width": 16, "height": 16})):
            code, _, answer = request("POST", s.url + path, body)
            assert code == 422 and "<lora:nope>" in answer["detail"] and answer["error"]["param"] == "prompt", path
        assert not s.queue.jobs and s.queue.batches == 0  # refused before queueing
    with serve(pipe) as s:
        code, _, answer = request("POST", s.url + "/sdapi/v1/txt2img", {**A1111, "prompt": "x <lora:ink>"})
        assert code == 422 and "<lora:ink>" in answer["detail"] and "--lora-dir" in answer["detail"]
        assert request("GET", s.url + "/sdapi/v1/loras")[2] == []


def test_a1111_lists_loras_and_embeddings(setup, tmp_path):
    pipe, loras, files = setup
    with serve(pipe, lora_dir=str(loras)) as s:
        code, _, listing = request("GET", s.url + "/sdapi/v1/loras")
        assert code == 200
        assert [(e["name"], e["alias"], e["path"]) for e in listing] == [
            ("ink", "ink", str(files["ink"])), ("wash", "wash", str(files["wash"]))]
        assert request("GET", s.url + "/sdapi/v1/embeddings")[2] == {"loaded": {}, "skipped": {}}
    write_a1111(tmp_path / "my-style.pt", torch.randn(2, 32))
    write_a1111(tmp_path / "too-wide.pt", torch.randn(1, 64))  # another family's width: skipped
    fresh = t2i.load(loras.parent / "sd1")  # not the shared pipe: the words stay added to it
    with pytest.warns(UserWarning, match="too-wide"), serve(fresh, embedding_dir=str(tmp_path)) as s:
        code, _, listing = request("GET", s.url + "/sdapi/v1/embeddings")
    empty = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    assert code == 200 and listing == {"loaded": {"my-style": {**empty, "shape": 32, "vectors": 2}},
                                       "skipped": {"too-wide": {**empty, "shape": 64, "vectors": 1}}}


def test_cli_refuses_a_missing_lora_dir(tmp_path, capsys):
    from t2i.cli import main

    assert main(["serve", "--lora-dir", str(tmp_path / "nope")]) == 2
    assert "--lora-dir: no such folder" in capsys.readouterr().err
