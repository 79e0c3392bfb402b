"""The schedule study: how should recurrent memory be spread across depth?

Trains a set of variants (memory schedules, learned gates, the full-attention excerpt baseline) with the
same model size, data order, seed and number of steps, evaluates each over full validation pieces, and
writes the comparison: results.csv, results.md and matplotlib figures.

A study folder holds:

    study.json               the shared options (StudyConfig), the variants and the command
    runs/NAME/               each variant's run folder (dsmr.training.trainer; resumable)
    results/NAME-seedS.json  each finished variant: its horizons, validation and training figures, its
                             curves (validation PPL, loss, gates over steps) and the environment it ran in
    results.csv, results.md, figures/*.png

A variant with a result file is finished and never trained again; an interrupted one resumes from its last
checkpoint. Each variant trains in a fresh Python process by default, because the CPU peak-memory meter
is the rise of the process's peak RSS (dsmr.core.runtime.PeakMemory), which memory kept from an earlier
variant would hide. `variants` may name a subset, so a study can be spread over processes or machines and
put together with `merge_studies`.
"""

from dsmr.study.report import (collect_results, merge_studies, results_csv, results_markdown, study_status,
                               write_report)
from dsmr.study.summary import summarize
from dsmr.study.run import epoch_steps, run_study, run_variant
from dsmr.study.variants import (PRESETS, SHARED_OPTIONS, StudyConfig, Variant, default_variants, preset_config,
                                 result_name, select_variants, train_config)

__all__ = ["StudyConfig", "PRESETS", "SHARED_OPTIONS", "Variant", "default_variants", "preset_config",
           "result_name", "select_variants", "train_config", "run_study", "run_variant", "epoch_steps",
           "collect_results", "merge_studies", "results_csv", "results_markdown", "study_status", "summarize",
           "write_report"]
