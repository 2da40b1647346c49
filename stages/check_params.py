"""check_params: validate the whole params.yaml in about a second, before any stage does work.

Its own DVC stage that reruns on every edit of params.yaml, so a typo anywhere (an unknown key,
a wrong type, an out-of-range value) fails `dvc repro` at once with every problem listed by key path.
"""
from __future__ import annotations

import logging

from finetune.params.core import ParamsError
from finetune.params.sections import load_params
from finetune.runtime.stage import configure_logging

log = logging.getLogger("finetune.check_params")


def main(path=None) -> None:
    configure_logging()
    try:
        params = load_params(path)
    except ParamsError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    log.info("params.yaml is valid: %d sections", len(type(params).model_fields))


if __name__ == "__main__":
    main()
