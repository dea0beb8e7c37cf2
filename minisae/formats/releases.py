"""SAELens's release names: `saelens:RELEASE/ID` -> the hub folder that holds that SAE.

SAELens users name a published SAE by release and id,

    SAE.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")

and SAELens looks both up in its table, sae_lens/pretrained_saes.yaml:

    gpt2-small-res-jb:                                   a release
      repo_id: jbloom/GPT2-Small-SAEs-Reformatted        its Hugging Face repository
      model: gpt2-small
      conversion_func: null                              null: the folder is in SAELens's own layout
      config_overrides: {model_from_pretrained_kwargs: {center_writing_weights: true}}
      saes:
      - id: blocks.8.hook_resid_pre                      what the user types
        path: blocks.8.hook_resid_pre                    the folder in the repository
        neuronpedia: gpt2-small/8-res-jb                 (optional) its Neuronpedia id
        norm_scaling_factor: 1.7                         (optional) its input scale, folded on load
        l0: 13.0, variance_explained: 0.99               (not used here)

minisae ships what resolution needs of that table, generated from the yaml (no sae-lens at
run time), as releases.json.gz beside this file:

    {"source": "...", "releases": {RELEASE: {"repo", "model", "conversion", "overrides",
                                             "saes": [[ID, PATH, NEURONPEDIA, NORM_SCALING_FACTOR], ...]}}}

PATH is null where it equals ID, and trailing nulls are dropped. Regenerate it with

    python -m minisae.formats.releases --from-yaml .venv/lib/python3.11/site-packages/sae_lens/pretrained_saes.yaml

`lookup` applies what SAELens applies: config_overrides replace the fields of cfg.json, the
Neuronpedia id becomes metadata.neuronpedia_id, and a norm_scaling_factor is the SAE's
input scale (SAELens folds it into the weights when cfg.json says
normalize_activations: expected_average_only_in; minisae's reader does the same).
minisae reads three of SAELens's conversions: null (SAELens's layout), gemma_2 (Gemma
Scope's params.npz, minisae/formats/npz.py) and dictionary_learning_1 (ae.pt +
config.json, minisae/formats/foreign_pt.py); the others are refused by name.
"""

import argparse
import difflib
import functools
import gzip
import json
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

from minisae.utils import atomic_write

PREFIX = "saelens:"
TABLE = Path(__file__).with_name("releases.json.gz")
# SAELens's conversion_func -> the files of one SAE's folder that minisae downloads, in order
LAYOUTS = {None: ("cfg.json", "sae_weights.safetensors"), "gemma_2": ("params.npz",),
           "dictionary_learning_1": ("config.json", "ae.pt")}
EXAMPLE = "saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre"


@dataclass
class Release:
    release: str  # e.g. "gpt2-small-res-jb"
    sae_id: str  # e.g. "blocks.8.hook_resid_pre"
    repo: str  # the hub repository, "OWNER/NAME"
    path: str  # the SAE's folder in it
    model: str  # the model, as SAELens names it ("gpt2-small")
    conversion: Optional[str] = None  # SAELens's conversion_func; None: SAELens's own layout
    overrides: dict = field(default_factory=dict)  # what replaces cfg.json's fields (neuronpedia_id too)
    norm_scaling_factor: Optional[float] = None  # the input scale SAELens folds in, if the table gives one

    @property
    def files(self) -> tuple:
        return LAYOUTS[self.conversion]


def is_release(ref) -> bool:
    return str(ref).startswith(PREFIX)


@functools.lru_cache(maxsize=1)
def table() -> dict:
    """The shipped table: release -> its entry (see the module docstring)."""
    with gzip.open(TABLE, "rt", encoding="utf-8") as f:
        return json.load(f)["releases"]


def lookup(ref: str) -> Release:
    """`saelens:RELEASE/ID` -> its Release; ValueError in one line naming what is unknown and
    the nearest names, or a layout minisae does not read."""
    body = str(ref)[len(PREFIX):] if is_release(ref) else str(ref)
    name, slash, sae_id = body.partition("/")
    if not slash or not name or not sae_id:
        raise ValueError(f"{ref!r}: a SAELens release name is saelens:RELEASE/ID, e.g. {EXAMPLE}")
    releases = table()
    if name not in releases:
        raise ValueError(f"unknown SAELens release {name!r}{nearest(name, releases)}; "
                         f"{len(releases)} releases are known (minisae/formats/releases.json.gz)")
    entry = releases[name]
    rows = {row[0]: row for row in entry["saes"]}
    if sae_id not in rows:
        raise ValueError(f"SAELens release {name!r} has no SAE {sae_id!r}{nearest(sae_id, rows)} "
                         f"(it has {len(rows)})")
    _, path, neuronpedia, scale = (*rows[sae_id], None, None, None)[:4]
    conversion = entry.get("conversion")
    if conversion not in LAYOUTS:
        raise ValueError(f"{PREFIX}{name}/{sae_id}: SAELens converts this release with its {conversion!r} loader; "
                         "minisae reads releases in SAELens's own layout, Gemma Scope's params.npz (gemma_2) "
                         "and dictionary_learning's ae.pt (dictionary_learning_1)")
    if conversion == "gemma_2" and "embedding" in (path or sae_id):
        raise ValueError(f"{PREFIX}{name}/{sae_id}: Gemma Scope's embedding SAEs read activations SAELens "
                         "rescales by sqrt(d_model) on load; minisae does not read them")
    overrides = {**(entry.get("overrides") or {}), "neuronpedia_id": neuronpedia}  # as get_config_overrides
    return Release(name, sae_id, entry["repo"], path or sae_id, entry["model"], conversion, overrides, scale)


def nearest(word: str, names) -> str:
    """', nearest: a, b, c' (the closest names by difflib's ratio), or '' if none is close."""
    close = difflib.get_close_matches(word, list(names), n=3, cutoff=0.5)
    return f"; nearest: {', '.join(close)}" if close else ""


# ---------------------------------------------------------------- generating the table

def from_yaml(yaml_path) -> dict:
    """The table from SAELens's pretrained_saes.yaml, read as SAELens reads it
    (get_pretrained_saes_directory: an integer path is its string)."""
    import yaml  # only to regenerate the table: not a run-time dependency

    with open(yaml_path, encoding="utf-8") as f:
        data = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    releases = {}
    for name, v in data.items():
        rows = []
        for s in v["saes"]:
            sae_id, path = str(s["id"]), str(s["path"])
            row = [sae_id, None if path == sae_id else path, s.get("neuronpedia"), s.get("norm_scaling_factor")]
            while row[-1] is None:
                row.pop()
            rows.append(row)
        entry = {"repo": v["repo_id"], "model": v["model"], "conversion": v.get("conversion_func")}
        if v.get("config_overrides"):
            entry["overrides"] = v["config_overrides"]
        releases[name] = {**entry, "saes": rows}
    return releases


def write_table(releases: dict, source: str, out=TABLE) -> Path:
    """Write the table as gzipped JSON (mtime 0: the same table gives the same bytes)."""
    text = json.dumps({"source": source, "releases": releases}, separators=(",", ":"), sort_keys=True)
    atomic_write(out, lambda f: f.write(gzip.compress(text.encode(), mtime=0)))
    return Path(out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minisae.formats.releases",
                                description="Regenerate minisae's table of SAELens releases from sae-lens's yaml.")
    p.add_argument("--from-yaml", required=True, type=Path, help="sae_lens/pretrained_saes.yaml")
    p.add_argument("--out", type=Path, default=TABLE, help="the table to write")
    args = p.parse_args(argv)
    try:
        source = f"sae-lens {version('sae-lens')} pretrained_saes.yaml"
    except PackageNotFoundError:  # the yaml without the package: say only what was read
        source = args.from_yaml.name
    releases = from_yaml(args.from_yaml)
    out = write_table(releases, source, args.out)
    n = sum(len(r["saes"]) for r in releases.values())
    print(f"{out}: {len(releases)} releases, {n} SAEs, {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
