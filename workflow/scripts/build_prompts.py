"""Snakemake script: build the k-shot prompts."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from headperturb import data, io, logs, models, prompts  # noqa: E402

log = logs.setup(snakemake.log[0])
d, p = snakemake.params.data, snakemake.params.prompts
train = data.load_split(d["path"], "train", d["hub_dataset"])
test = data.load_split(d["path"], "test", d["hub_dataset"])
info = io.read_json(Path(snakemake.input.model) / models.INFO_FILE)
built = prompts.build_prompts(
    train,
    test,
    models.load_tokenizer(snakemake.input.model),
    k_shot=p["k_shot"],
    n_test=p["n_test"],
    max_review_tokens=p["max_review_tokens"],
    template=p["template"],
    verbalizers=tuple(p["verbalizers"]),
    separator=p["separator"],
    seed=p["seed"],
    context_length=info["context_length"],
)
io.write_parquet(snakemake.output.prompts, built.prompts)
io.write_parquet(snakemake.output.demonstrations, built.demonstrations)
io.write_json(snakemake.output.info, built.info)
log.info(
    "%d prompts of %.0f tokens on average (longest %d), %d demonstrations, shared prefix %d tokens",
    len(built.prompts), built.info["mean_tokens"], built.info["max_tokens"],
    len(built.demonstrations), built.info["prefix_len"],
)  # fmt: skip
