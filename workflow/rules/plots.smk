# Figures from the contribution table, one rule for all of them (headperturb.plots.PLOTS).


rule plot:
    input:
        plot_input,
    output:
        report(
            f"{RESULTS}/plots/{{plot}}.png",
            caption="../report/plots.rst",
            category="Plots",
            subcategory="{plot}",
        ),
    log:
        f"{LOGS}/plot_{{plot}}.log",
    wildcard_constraints:
        plot="|".join(PLOT_NAMES),
    run:
        in_process(rule, input, output, params, wildcards, threads, log)
