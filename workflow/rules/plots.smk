# Figures from the contribution table, one rule for all of them (headperturb.analysis.figures.PLOTS).


rule plot:
    input:
        table=plot_input,
    output:
        figure=report(
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
        steps.plot(input, output, params, wildcards, threads, log)
