# Figures from the contribution table.


rule plot_distributions:
    input:
        TABLE,
    output:
        f"{RESULTS}/plots/contribution_distributions.png",
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
        f"{RESULTS}/plots/detailed_head_analysis.png",
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
        f"{RESULTS}/plots/layer_head_heatmap.png",
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
        f"{RESULTS}/plots/contribution_vs_scale.png",
    log:
        f"{LOGS}/plot_scales.log",
    conda:
        ENV
    script:
        "../scripts/plot.py"
