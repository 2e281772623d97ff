"""A recipe from the Hub to the Hub through the local Hub double with the real huggingface_hub client.

Four inputs (the base, two fine-tunes, and the base with an adapter folded in) are read with ranged GETs only,
each input's weight bytes served about once (the base is shared by two inputs and still read once), the result is
published in one commit, and its card pins every input to the commit that was read.
"""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import HfApi, snapshot_download

from tests.support.hubseed import ALICE, _drain_capture, merged_commits, seed
from tests.support.recipe_models import load_state, make_finetune
from worker.cli import main
from worker.engine import LocalDirSink, LocalDirSource
from worker.engine.plan import MergeOptions
from worker.engine.recipe.planner import OpenedRef
from worker.engine.recipe.recipe import parse_recipe
from worker.engine.recipe.run import merge_recipe

pytestmark = [pytest.mark.xdist_group("hub"), pytest.mark.slow]


@pytest.fixture(scope="module")
def finetunes(seeded_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_hub")
    return [make_finetune(seeded_model.base_dir, root / f"ft{i}", seed=300 + i) for i in (1, 2)]


RECIPE = """
merge_method: task_arithmetic
base_model: alice/base
models:
  - model: alice/ft1
    parameters: {weight: 0.5}
  - model: alice/ft2@main
    parameters: {weight: 0.3}
  - model: alice/base+alice/adapter
    parameters: {weight: 0.4}
dtype: bfloat16
"""


def _push_recipe(hub, tmp_path, capsys, text: str, target: str) -> str:
    """`lorafold merge --recipe` of `text` pushed to `target`, the Hub's request log cleared first; its stdout."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    hub.clear_log()
    rc = main(["merge", "--recipe", str(recipe), "--push-to", target, "--token", ALICE, "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def _same_as_local(text: str, published, out) -> None:
    """The recipe `text` (local folders) merged into `out` gives the published tensors bit for bit."""
    r = parse_recipe(text)
    refs = {i.ref.text: OpenedRef(i.ref.text, LocalDirSource(i.ref.model), LocalDirSource(i.ref.adapter) if i.ref.adapter else None)
            for i in r.inputs}
    merge_recipe(r, refs, LocalDirSink(out), MergeOptions(device="cpu"))
    a, b = load_state(published), load_state(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_recipe_from_the_hub_reads_by_ranges_once_and_commits_once(hub, seeded_model, finetunes, tmp_path, capsys):
    seed(hub, seeded_model)
    api = HfApi(endpoint=hub.url)
    for i, folder in enumerate(finetunes, 1):
        api.create_repo(f"alice/ft{i}", token=ALICE)
        api.upload_folder(repo_id=f"alice/ft{i}", folder_path=str(folder), token=ALICE, commit_message="seed")
    _drain_capture()
    capsys.readouterr()
    out = _push_recipe(hub, tmp_path, capsys, RECIPE, "alice/recipe-merged")
    assert "Merged 4 inputs (task_arithmetic)" in out

    commits = merged_commits(hub, "alice/recipe-merged")
    assert len(commits) == 1

    for repo in ("alice/base", "alice/ft1", "alice/ft2"):
        gets = [r for r in hub.request_log if r.method == "GET" and f"/{repo}/resolve/" in r.path and r.path.endswith(".safetensors")]
        assert gets and all(r.range for r in gets), f"every read of {repo}'s shards must be a ranged GET"
        served = sum(r.bytes_sent for r in gets)
        # weights once; headers (100 kB reads) once per model, and once more by the plan of the adapter folded into
        # alice/base
        headers = 6 if repo == "alice/base" else 3
        assert seeded_model.base_bytes * 0.99 <= served <= 1.02 * seeded_model.base_bytes + headers * 100_000, (repo, served)
    assert not [r for r in hub.request_log if "snapshot" in r.path]

    local = snapshot_download("alice/recipe-merged", endpoint=hub.url, token=ALICE, local_dir=tmp_path / "dl")
    card = (tmp_path / "dl" / "README.md").read_text()
    assert "base_model:\n- \"alice/base\"" in card and "base_model_relation: merge" in card
    shas = {repo: api.repo_info(repo, token=ALICE).sha for repo in ("alice/base", "alice/ft1", "alice/ft2", "alice/adapter")}
    assert f"alice/ft2@{shas['alice/ft2']}" in card and f"alice/base@{shas['alice/base']}+alice/adapter@{shas['alice/adapter']}" in card
    assert (tmp_path / "dl" / "tokenizer.json").read_bytes() == (seeded_model.base_dir / "tokenizer.json").read_bytes()

    # the same recipe on the local folders gives the same bytes
    text = (RECIPE.replace("alice/base+alice/adapter", f"{seeded_model.base_dir}+{seeded_model.adapter_dir}")
            .replace("alice/base", str(seeded_model.base_dir)).replace("alice/ft1", str(finetunes[0]))
            .replace("alice/ft2@main", str(finetunes[1])))
    _same_as_local(text, local, tmp_path / "local")


def test_passthrough_slices_from_the_hub_read_by_ranges(hub, seeded_model, finetunes, tmp_path, capsys):
    """A frankenmerge of Hub inputs (one with an adapter folded in) reads only ranges, pins each slice's input in the
    card, and gives the bytes the same recipe gives on the local folders."""
    import json

    seed(hub, seeded_model)
    api = HfApi(endpoint=hub.url)
    api.create_repo("alice/ft1", token=ALICE)
    api.upload_folder(repo_id="alice/ft1", folder_path=str(finetunes[0]), token=ALICE, commit_message="seed")
    _drain_capture()
    capsys.readouterr()
    n = json.loads((seeded_model.base_dir / "config.json").read_text())["num_hidden_layers"]
    text = (f"merge_method: passthrough\nbase_model: alice/base\nslices:\n"
            f"  - sources:\n      - {{model: alice/base+alice/adapter, layer_range: [0, {n}]}}\n"
            f"  - sources:\n      - {{model: alice/ft1, layer_range: [1, {n}], parameters: {{scale: 0.5}}}}\n")
    out = _push_recipe(hub, tmp_path, capsys, text, "alice/franken")
    assert "(passthrough)" in out
    for repo in ("alice/base", "alice/ft1"):  # the models' shards by ranges (the small adapter is fetched whole)
        gets = [r for r in hub.request_log if r.method == "GET" and f"/{repo}/resolve/" in r.path and r.path.endswith(".safetensors")]
        assert gets and all(r.range for r in gets), repo
    local = snapshot_download("alice/franken", endpoint=hub.url, token=ALICE, local_dir=tmp_path / "dl")
    assert json.loads((tmp_path / "dl" / "config.json").read_text())["num_hidden_layers"] == 2 * n - 1
    card = (tmp_path / "dl" / "README.md").read_text()
    sha = api.repo_info("alice/ft1", token=ALICE).sha
    assert f"alice/ft1@{sha}" in card and "Its layers are the layer ranges of the recipe's slices" in card

    local_text = (text.replace("alice/base+alice/adapter", f"{seeded_model.base_dir}+{seeded_model.adapter_dir}")
                  .replace("alice/base", str(seeded_model.base_dir)).replace("alice/ft1", str(finetunes[0])))
    _same_as_local(local_text, local, tmp_path / "local")
