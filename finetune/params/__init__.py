"""The params schema: one module per `params.yaml` section, so that a stage's code deps in dvc.yaml are
the schema modules of exactly the sections it reads (editing the train schema reruns train, not base).

Values live in `params.yaml` only: no field here has a default. A test builds its config from
params.yaml plus explicit overrides with `finetune.params.core.section("train", method="full")`.
Kept empty on purpose: importing `finetune.params.train` must not import the other sections.
"""
