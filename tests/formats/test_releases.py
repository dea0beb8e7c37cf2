"""SAELens release names, saelens:RELEASE/ID (minisae/formats/releases.py).

The shipped table agrees, entry by entry, with sae-lens's own reading of its yaml (skipped
without sae-lens); a name resolves to the hub folder the table names, is downloaded from a
fake hub on 127.0.0.1 and converted, with the release's overrides (center_writing_weights,
the Neuronpedia id, the input scale) applied as SAELens applies them; a name that is not
in the table is one line naming it and the nearest names, before any download."""

import http.server
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import serving  # pytest puts tests/ on sys.path
import torch

from minisae import formats
from minisae.cli import entry
from minisae.formats import releases
from minisae.pipeline.hooked_sae import HookedSAE

JB = "saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre"


@pytest.mark.formats
@pytest.mark.slow  # sae-lens reads its 1.5 MB yaml: ~10 s
def test_the_table_agrees_with_sae_lens():
    directory = pytest.importorskip("sae_lens.loading.pretrained_saes_directory",
                                    reason="sae-lens not installed (pip install -e '.[formats]')")
    theirs = directory.get_pretrained_saes_directory()
    ours = releases.table()
    assert sorted(ours) == sorted(theirs)
    n = 0
    for name, lookup in theirs.items():
        entry_ = ours[name]
        assert (entry_["repo"], entry_["model"], entry_["conversion"], entry_.get("overrides")) == \
            (lookup.repo_id, lookup.model, lookup.conversion_func, lookup.config_overrides or None), name
        assert [row[0] for row in entry_["saes"]] == list(lookup.saes_map), name
        for row in entry_["saes"]:  # every row, read or refused
            sae_id, path, neuronpedia, scale = (*row, None, None, None)[:4]
            assert (path or sae_id, neuronpedia, scale) == (lookup.saes_map[sae_id], lookup.neuronpedia_id[sae_id],
                                                           lookup.norm_scaling_factor.get(sae_id)), (name, sae_id)
        for sae_id, path in lookup.saes_map.items():  # and what lookup makes of it, where minisae reads it
            if lookup.conversion_func not in releases.LAYOUTS or \
                    lookup.conversion_func == "gemma_2" and "embedding" in path:
                continue  # refused by name (tested below)
            r = releases.lookup(f"saelens:{name}/{sae_id}")
            assert (r.repo, r.path) == directory.get_repo_id_and_folder_name(name, sae_id)
            assert r.overrides == directory.get_config_overrides(name, sae_id)
            assert r.norm_scaling_factor == directory.get_norm_scaling_factor(name, sae_id)
            n += 1
    assert n > 3500  # SAELens's layout, Gemma Scope's and dictionary_learning's: 3,955 SAEs


def test_the_docs_count_what_minisae_reads():
    """docs/08_formats.md quotes how many of the table's SAEs minisae reads: counted here."""
    readable, total = 0, 0
    for name, entry_ in releases.table().items():
        for row in entry_["saes"]:
            total += 1
            try:
                releases.lookup(f"saelens:{name}/{row[0]}")
            except ValueError:
                continue
            readable += 1
    doc = (Path(__file__).resolve().parents[2] / "docs" / "08_formats.md").read_text(encoding="utf-8")
    assert f"({readable:,} of the table's {total:,} SAEs)" in " ".join(doc.split())


def test_unknown_names_are_one_line_with_the_nearest(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no name may reach it
    cases = [("saelens:gpt2-small-res-jbb/blocks.8.hook_resid_pre",
              "unknown SAELens release 'gpt2-small-res-jbb'; nearest: gpt2-small-res-jb,"),
             ("saelens:gpt2-small-res-jb/blocks.8.hook_resid_pr",
              "SAELens release 'gpt2-small-res-jb' has no SAE 'blocks.8.hook_resid_pr'; nearest: "
              "blocks.8.hook_resid_pre,"),
             ("saelens:gpt2-small-res-jb", "a SAELens release name is saelens:RELEASE/ID"),
             ("saelens:gemma-scope-2-4b-pt-transcoders-all/layer_0_width_16k_l0_big",
              "SAELens converts this release with its 'gemma_3' loader")]
    for name, says in cases:
        assert entry(["convert", name, str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert entry(["features", "--sae", name, "--model", "gpt2"]) == 2  # checked before any model loads
        assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- a fake hub

class Hub(http.server.BaseHTTPRequestHandler):
    """GET/HEAD /OWNER/NAME/resolve/main/PATH: files[PATH], or 404."""
    files = {}
    asked = []

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(head=True)

    def do_GET(self):
        self.answer(head=False)

    def answer(self, head):
        self.asked.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    with serving(Hub) as url:
        yield url


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server)
    monkeypatch.setenv("MINISAE_CACHE", str(tmp_path / "cache"))
    Hub.files, Hub.asked = {}, []
    return server


def serve_saelens(tmp_path, random_sae, repo, path, cfg_changes):
    """A pre-6 SAELens folder, as jbloom's GPT-2 SAEs are published (top-level model_name,
    hook_point, no metadata), served at repo/path; the SAE."""
    sae = random_sae("relu", 8, 16, dtype=torch.float32)
    folder = tmp_path / "src"
    formats.save(sae, folder, model="gpt2", hook="blocks.8.hook_resid_pre")
    cfg = {"model_name": "gpt2-small", "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8,
           "hook_point_head_index": None, "d_in": 8, "d_sae": 16, "dtype": "torch.float32",
           "context_size": 128, "dataset_path": "Skylion007/openwebtext", **cfg_changes}
    Hub.files = {f"/{repo}/resolve/main/{path}/cfg.json": json.dumps(cfg).encode(),
                 f"/{repo}/resolve/main/{path}/sae_weights.safetensors":
                     (folder / "sae_weights.safetensors").read_bytes()}
    return sae


def test_a_release_name_downloads_and_converts(hub, tmp_path, random_sae):
    sae = serve_saelens(tmp_path, random_sae, "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre", {})
    assert entry(["convert", JB, str(tmp_path / "out")]) == 0
    assert Hub.asked[0] == "/jbloom/GPT2-Small-SAEs-Reformatted/resolve/main/blocks.8.hook_resid_pre/cfg.json"
    md = json.loads((tmp_path / "out" / "cfg.json").read_text())["metadata"]
    assert md["model_from_pretrained_kwargs"] == {"center_writing_weights": True}  # the release's override
    assert md["neuronpedia_id"] == "gpt2-small/8-res-jb" and md["model_name"] == "gpt2-small"
    assert md["hook_name"] == "blocks.8.hook_resid_pre"
    hsae = HookedSAE.load(tmp_path / "out")
    assert hsae.centred and hsae.model_name == "gpt2"
    x = torch.randn(5, 8)
    assert torch.allclose(formats.load(tmp_path / "out")[0].encode(x), sae.encode(x), atol=1e-6)  # the file's SAE
    assert torch.allclose(hsae.sae.encode(x), sae.encode(x - x.mean(-1, keepdim=True)), atol=1e-5)  # on a model


def test_the_table_s_input_scale_is_folded(hub, tmp_path, random_sae):
    """gpt2-small-mlp-tm: normalize_activations expected_average_only_in, its factor in the table only."""
    r = releases.lookup("saelens:gpt2-small-mlp-tm/blocks.3.hook_mlp_out")
    assert r.norm_scaling_factor is not None and ":" in r.path  # a folder name with a colon, quoted in the URL
    serve_saelens(tmp_path, random_sae, r.repo, r.path.replace(":", "%3A"),
                  {"hook_point": "blocks.3.hook_mlp_out", "normalize_activations": "expected_average_only_in"})
    _, meta = formats.load("saelens:gpt2-small-mlp-tm/blocks.3.hook_mlp_out")
    assert meta["scale"] == pytest.approx(r.norm_scaling_factor) and meta["hook"] == "blocks.3.hook_mlp_out"
    assert meta["saelens_metadata"]["dataset_path"] == "Skylion007/openwebtext"


def test_a_gemma_scope_release_reads_its_npz(hub, tmp_path, random_sae):
    r = releases.lookup("saelens:gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")
    assert r.conversion == "gemma_2" and r.files == ("params.npz",)
    D, F = 8, 16
    g = np.random.default_rng(0)
    arrays = {"W_enc": g.normal(size=(D, F)), "W_dec": g.normal(size=(F, D)), "b_enc": g.normal(size=F),
              "b_dec": g.normal(size=D), "threshold": g.uniform(0, 0.5, size=F)}
    buf = io.BytesIO()
    np.savez(buf, **{k: v.astype(np.float32) for k, v in arrays.items()})
    Hub.files = {f"/{r.repo}/resolve/main/{r.path}/params.npz": buf.getvalue()}
    sae, meta = formats.load("saelens:gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")
    assert meta["hook"] == "blocks.20.hook_resid_post" and meta["model"] == "gemma-2-2b"
    assert meta["saelens_metadata"]["neuronpedia_id"] == r.overrides["neuronpedia_id"]
    x = torch.randn(4, D)
    pre = x @ torch.tensor(arrays["W_enc"], dtype=torch.float32) + torch.tensor(arrays["b_enc"], dtype=torch.float32)
    want = pre * (pre > torch.tensor(arrays["threshold"], dtype=torch.float32))  # the Gemma Scope tutorial's
    assert torch.allclose(sae.encode(x), torch.relu(want), atol=1e-5)


def test_a_dictionary_learning_release_reads_its_ae_pt(hub, tmp_path):
    name = "saelens:llama-3.1-8b-instruct-andyrdt/resid_post_layer_3_trainer_1"
    r = releases.lookup(name)
    assert r.conversion == "dictionary_learning_1" and r.files == ("config.json", "ae.pt")
    g = torch.Generator().manual_seed(0)
    sd = {"bias": torch.randn(8, generator=g), "encoder.weight": torch.randn(16, 8, generator=g),
          "encoder.bias": torch.randn(16, generator=g), "decoder.weight": torch.randn(8, 16, generator=g)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    config = {"trainer": {"dict_class": "AutoEncoder", "lm_name": "meta-llama/Llama-3.1-8B-Instruct", "layer": 3,
                          "submodule_name": "resid_post_layer_3"}}
    Hub.files = {f"/{r.repo}/resolve/main/{r.path}/ae.pt": buf.getvalue(),
                 f"/{r.repo}/resolve/main/{r.path}/config.json": json.dumps(config).encode()}
    sae, meta = formats.load(name)
    assert meta["hook"] == "blocks.3.hook_resid_post" and meta["layout"] == "pt"
    x = torch.randn(4, 8)
    want = torch.relu((x - sd["bias"]) @ sd["encoder.weight"].T + sd["encoder.bias"])  # their AutoEncoder
    assert torch.allclose(sae.encode(x), want, atol=1e-5)


def test_a_missing_file_is_one_line_and_caches_nothing(hub, tmp_path, capsys):
    assert entry(["convert", JB, str(tmp_path / "out"), "--timeout", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blocks.8.hook_resid_pre/cfg.json: HTTP 404" in err[0], err
    assert not (tmp_path / "cache").exists() or not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


@pytest.mark.slow  # a real process: python and torch start in seconds
def test_python_m_minisae_convert_a_release(hub, tmp_path, random_sae):
    serve_saelens(tmp_path, random_sae, "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre", {})
    done = subprocess.run([sys.executable, "-m", "minisae", "convert", JB, str(tmp_path / "out" / "x")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{JB} (saelens) -> " in done.stdout
    md = json.loads((tmp_path / "out" / "x" / "cfg.json").read_text())["metadata"]
    assert md["neuronpedia_id"] == "gpt2-small/8-res-jb"
