"""Snakemake script: load the model source once and save it as safetensors + tokenizer."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from headperturb import logs, models  # noqa: E402

log = logs.setup(snakemake.log[0])
models.set_threads(snakemake.threads)
p = snakemake.params
info = models.prepare_model(
    p.source,
    snakemake.output[0],
    gguf_file=p.gguf_file,
    dtype=p.dtype,
    sha256=p.sha256,
    site_override=p.site,
)
log.info(
    "prepared %s: %s, %d layers x %d query heads (%s KV heads), head_dim %d, %d parameters",
    p.source, info["architecture"], info["n_layers"], info["n_heads"], info["n_kv_heads"],
    info["head_dim"], info["n_parameters"],
)  # fmt: skip
