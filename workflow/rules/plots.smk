# Figures from the contribution table.


rule plot_distributions:
    input:
        TABLE,
    output:
        report(
            f"{RESULTS}/plots/contribution_distributions.png",
            caption="../report/distributions.rst",
            category="Plots",
            subcategory="per run",
        ),
    log:
        f"{LOGS}/plot_distributions.log",
    conda:
        ENV
    script:
        "../scripts/plot.py"


rule plot_heads:
    input:
        TABLE,
    output:
        report(
            f"{RESULTS}/plots/detailed_head_analysis.png",
            caption="../report/heads.rst",
            category="Plots",
            subcategory="per head",
        ),
    log:
        f"{LOGS}/plot_heads.log",
    conda:
        ENV
    script:
        "../scripts/plot.py"


rule plot_heatmap:
    input:
        TABLE,
    output:
        report(
            f"{RESULTS}/plots/layer_head_heatmap.png",
            caption="../report/heatmap.rst",
            category="Plots",
            subcategory="per layer",
        ),
    log:
        f"{LOGS}/plot_heatmap.log",
    conda:
        ENV
    script:
        "../scripts/plot.py"


rule plot_scales:
    input:
        TABLE,
    output:
        report(
            f"{RESULTS}/plots/contribution_vs_scale.png",
            caption="../report/scales.rst",
            category="Plots",
            subcategory="per scale",
        ),
    log:
        f"{LOGS}/plot_scales.log",
    conda:
        ENV
    script:
        "../scripts/plot.py"
