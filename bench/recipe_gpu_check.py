"""Device check for recipes: every method and the adapter sum with --device cuda against the CPU (and the sum against
the float32 sum of the factors). Prints one line per case; exit 1 on any mismatch over 1 ulp.

    python -m bench.recipe_gpu_check /tmp/recipe-gpu
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch


def main(root: str) -> int:
    from tests.engine.test_recipe_merge import deltas_from_factors
    from tests.engine.test_recipe_mergekit import lorafold, recipes
    from tests.support.recipe_models import load_state, recipe_set
    from tests.support.tensor_compare import ulp_distance
    from worker.engine import LocalDirSink, LocalDirSource
    from worker.engine.plan import MergeOptions
    from worker.engine.recipe.planner import OpenedRef
    from worker.engine.recipe.recipe import parse_recipe
    from worker.engine.recipe.run import merge_adapters, merge_recipe

    assert torch.cuda.is_available(), "no CUDA device"
    out = Path(root)
    bad = 0
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        m = recipe_set(out / "models", dtype)
        texts = recipes(m, name)
        texts["dare_ties"] = (f"merge_method: dare_ties\nbase_model: {m['base']}\nmodels:\n"
                              f"  - model: {m['ft1']}\n    parameters: {{weight: 0.6, density: 0.4}}\n"
                              f"  - model: {m['base']}+{m['lora']}\n    parameters: {{weight: 0.4, density: 0.4}}\n")
        for method, text in texts.items():
            cpu = lorafold(text, out / f"cpu-{method}-{name}")
            r = parse_recipe(text)
            refs = {i.ref.text: OpenedRef(i.ref.text, LocalDirSource(i.ref.model), LocalDirSource(i.ref.adapter) if i.ref.adapter else None)
                    for i in r.inputs}
            t0 = time.time()
            merge_recipe(r, refs, LocalDirSink(out / f"cuda-{method}-{name}"), MergeOptions(device="cuda"))
            gpu = load_state(out / f"cuda-{method}-{name}")
            worst = max(ulp_distance(cpu[k], gpu[k]) for k in cpu)
            bad += worst > 1
            print(f"{name} {method}: cuda vs cpu worst {worst} ulp ({time.time() - t0:.2f} s)", flush=True)
        weights = {"lora": 0.7, "rslora": -0.45}
        adapters = [(k, LocalDirSource(m[k]), w) for k, w in weights.items()]
        merge_adapters(LocalDirSource(m["base"]), adapters, LocalDirSink(out / f"sum-{name}"), MergeOptions(device="cuda"))
        got, base = load_state(out / f"sum-{name}"), load_state(m["base"])
        deltas = {k: deltas_from_factors(m[k]) for k in weights}
        worst = 0
        for k, w in base.items():
            ref = w.float()
            for a, wt in weights.items():
                if k in deltas[a]:
                    ref = ref + wt * deltas[a][k]
            worst = max(worst, ulp_distance(got[k], ref.to(dtype)))
        bad += worst > 1
        print(f"{name} adapter sum on cuda vs float32 factors: worst {worst} ulp", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/recipe-gpu"))
