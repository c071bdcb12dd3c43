# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The lifecycle of a tenant, on CLINC150
#
# Train the ten domain experts, look at how the gate routes, grow a new tenant from a file of its own,
# hibernate it and wake it, evaluate, and export a serving bundle.
#
# This file is the notebook's source (jupytext percent format, reviewable in git); open it with
# `jupytext --to ipynb notebooks/lifecycle.py` or in Jupyter with jupytext installed. `MOE_NOTEBOOK_TINY=1`
# makes it a seconds-long run on the tiny trunk (the test suite executes it so).

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from moe.data import read_tenant_file
from moe.data.clinc150 import clinc150_tenants
from moe.inference import load_mixture, predict
from moe.lifecycle import Lifecycle
from moe.paths import cache_dir
from moe.serving import Server
from moe.store import ExpertStore
from moe.tasks import train
from moe.tasks.lifecycle import growth_config
from moe.trunk import FeatureCache

TINY = os.environ.get("MOE_NOTEBOOK_TINY") == "1"
ROOT = Path.cwd() if (Path.cwd() / "conf").is_dir() else Path.cwd().parent
OUT = Path(os.environ.get("MOE_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="moe-notebook-"))
DOMAINS = ["banking", "travel", "meta"] if TINY else None
print("outputs in", OUT)


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


# %% [markdown]
# ## 1. Train the domain experts and their gate

# %%
overrides = ["experiment=clinc150", "logger=csv", f"paths.output_dir={OUT / 'run'}"]
if TINY:
    overrides += ["trunk=tiny", "trainer.max_epochs=2", f"data.tenants.domains=[{','.join(DOMAINS)}]"]
cfg = compose_config("train", overrides)
metrics = train.run(cfg)
{k: round(v, 2) for k, v in metrics.items() if k.startswith("test/")}

# %% [markdown]
# ## 2. Inspect routing: which expert does each domain's test query reach first?

# %%
trunk = instantiate(cfg.trunk)
encode = FeatureCache(cache_dir() / "features", trunk).encode
store = ExpertStore(OUT / "run" / "experts")
model = load_mixture(store, trunk_fingerprint=trunk.fingerprint)
tenants = clinc150_tenants(domains=DOMAINS)
confusion = torch.zeros(len(tenants), len(model.tenants))
with torch.no_grad():
    for row, tenant in enumerate(tenants):
        chosen = model(encode([e.text for e in tenant.split("test")])).experts[:, 0]
        confusion[row] += torch.bincount(model.expert_tenant[chosen], minlength=len(model.tenants))
fig, ax = plt.subplots(figsize=(5, 4))
ax.imshow(confusion / confusion.sum(1, keepdim=True), cmap="viridis")
ax.set_xticks(range(len(model.tenants)), model.tenants, rotation=60, ha="right")
ax.set_yticks(range(len(tenants)), [t.name for t in tenants])
ax.set_xlabel("top expert")
ax.set_ylabel("query's domain")
plt.show()
print(f"routing accuracy {confusion.diag().sum() / confusion.sum() * 100:.1f} %")

# %% [markdown]
# ## 3. Grow a new tenant from its own file, with columns of its own naming

# %%
rows = [
    ("where is my parcel", "track"),
    ("has my order shipped", "track"),
    ("track package 123", "track"),
    ("cancel my order please", "cancel"),
    ("i no longer want this order", "cancel"),
    ("stop my purchase", "cancel"),
]
acme_file = OUT / "acme.csv"
lines = ["utterance,intent,split"] + [f"{text},{label},train" for text, label in rows * 4]
lines += [f"{text},{label},{split}" for split in ("val", "test") for text, label in rows]
acme_file.write_text("\n".join(lines) + "\n")
acme = read_tenant_file("acme", acme_file, text_column="utterance", label_column="intent", split_column="split")
growth = growth_config(compose_config("lifecycle", [f"growth.epochs={5 if TINY else 45}", "tenant.name=acme"]))
lifecycle = Lifecycle(store, trunk, encode, growth)
lifecycle.grow(acme)
model = load_mixture(store, trunk_fingerprint=trunk.fingerprint)
queries = ["has my parcel shipped yet", "what is my account balance"]
print("routed:      ", predict(model, encode(queries)))
print("tenant given:", predict(model, encode(queries), model.tenant_ids(["acme", "banking"])))

# %% [markdown]
# ## 4. Hibernate and wake: the woken tenant answers exactly as before it slept

# %%
banking_test = encode([e.text for e in tenants[0].split("test")])
before = model(banking_test, model.tenant_ids(["banking"] * len(banking_test))).log_probs
lifecycle.hibernate("banking")
print("awake tenants while banking sleeps:", store.tenants())
lifecycle.wake("banking")
model = load_mixture(store, trunk_fingerprint=trunk.fingerprint)
after = model(banking_test, model.tenant_ids(["banking"] * len(banking_test))).log_probs
assert torch.equal(before[..., :15], after[..., :15]), "woken tenant changed its predictions"
print("identical predictions after waking")

# %% [markdown]
# ## 5. Evaluate and export a serving bundle

# %%
evaluation = compose_config(
    "evaluate",
    [f"store_dir={store.root}", f"paths.output_dir={OUT / 'eval'}", "logger=csv"]
    + ([f"data.tenants.domains=[{','.join(DOMAINS)}]"] if TINY else []),
)
from moe.tasks import evaluate  # noqa: E402

report = evaluate.run(evaluation)
{k: round(v, 2) for k, v in report.items() if k.startswith("test/") and isinstance(v, float)}

# %%
from moe.tasks import export  # noqa: E402

export_cfg = compose_config(
    "export",
    [f"store_dir={store.root}", f"paths.output_dir={OUT / 'bundle'}"]
    + ([f"data.tenants.domains=[{','.join(DOMAINS)}]"] if TINY else []),
)
export.run(export_cfg)
server = Server(OUT / "bundle", budget_bytes=8 << 20)
server.predict(["i want to book a flight", "has my parcel shipped yet"], tenant=[None, "acme"])
