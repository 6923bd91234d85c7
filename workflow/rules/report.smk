rule report:
    """Tables (ours beside the published values), figures and metrics of every finished run."""
    input:
        summaries=[ancient(f"results/runs/{r.path}/summary.json") for r in RUNS.values()],
        evaluations=[ancient(f"results/runs/{r.path}/eval_test.json") for r in RUNS.values()],
        explained=[ancient(f"results/runs/{path}/explain_test.json") for path in EXPLAINED],
    output:
        tables=report(
            directory("results/tables"),
            patterns=["{name}.csv"],
            caption="../report/tables.rst",
            category="Tables",
        ),
        figures=report(
            directory("results/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
        vectors=directory("results/figures-svg"),
        metrics="results/metrics.json",
        model_metrics=directory("results/metrics"),
        curves=directory("results/curves"),
        summary=report("results/report.md", caption="../report/summary.rst", category="Summary"),
    log:
        "logs/report.log",
    conda:
        "../envs/report.yaml"
    params:
        published_as=published_as_args(config),
    shell:
        # The config's runs by their summaries: report names every other run directory.
        "lambdapipe report --runs results/runs --out results {params.published_as}"
        " {input.summaries} > {log} 2>&1"
