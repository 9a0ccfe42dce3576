# Figures from the contribution table, one rule for all of them (headperturb.analysis.figures.PLOTS).


rule plot:
    input:
        table=plot_input,
    output:
        figure=report(
            PATHS.plot("{plot}"),
            caption="../report/plots.rst",
            category="Plots",
            subcategory="{plot}",
        ),
    log:
        PATHS.log("plot_{plot}"),
    wildcard_constraints:
        plot="|".join(PLOT_NAMES),
    run:
        steps.plot(input, output, params, wildcards, threads, log)
