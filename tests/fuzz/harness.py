"""One runner for every fuzz target: coverage-guided with atheris, seeded from files verydeep writes.

A target is a module ``fuzz_<name>.py`` in this folder that defines

- ``seeds(folder: Path) -> list[bytes]``: valid inputs, written with verydeep's own writers, that
  the fuzzer mutates (a seeded corpus finds deep bugs in seconds, a blank one in hours);
- ``one_input(data: bytes, folder: Path) -> None``: feed one input to the parser under test.

and ends with ``if __name__ == "__main__": main(seeds, one_input, ["verydeep.<module>"])``: those
modules, and the verydeep modules they import, are instrumented for coverage (torch is not); a
target whose inputs reach a library's parser adds that library to ``instrument`` (Pillow for
``fuzz_image.py``, zipfile for ``fuzz_scores.py``). A ``VerydeepError`` is the correct answer to
a bad file; any other exception, a hang past ``-timeout`` or memory past ``-rss_limit_mb`` is a
defect, and libFuzzer writes the input that caused it as ``crash-*``.

Run one target for a minute (the long run is the same command with a larger time)::

    python tests/fuzz/fuzz_prototxt.py -max_total_time=60 -rss_limit_mb=3072 -timeout=20

``tests/test_fuzz.py`` runs each target for a few seconds in CI.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

Seeds = Callable[[Path], list[bytes]]
OneInput = Callable[[bytes, Path], None]


def main(seeds: Seeds, one_input: OneInput, modules: list[str], instrument: Sequence[str] = ("verydeep",)) -> None:
    """Write the seed corpus, then fuzz ``one_input`` until libFuzzer's limits stop it.
    ``modules`` are imported with the packages named in ``instrument`` traced for coverage."""
    import importlib

    import atheris

    # Only the packages named in ``instrument`` are traced, whichever module imports them first
    # (torch imports zipfile), so torch and numpy are imported here untraced.
    with atheris.instrument_imports(include=list(instrument)):
        for module in modules:
            importlib.import_module(module)
    from verydeep.errors import VerydeepError

    work = Path(tempfile.mkdtemp(prefix="verydeep-fuzz-"))
    corpus = work / "corpus"
    corpus.mkdir()
    scratch = work / "scratch"
    scratch.mkdir()
    seed_files = work / "seed-files"  # where a target's writers put its seeds
    seed_files.mkdir()
    for i, seed in enumerate(seeds(seed_files)):
        (corpus / f"seed{i}").write_bytes(seed)

    def test_one_input(data: bytes) -> None:
        try:
            one_input(data, scratch)
        except VerydeepError as error:
            message = str(error)
            # The CLI prints the message on one line; an empty or multi-line one is a defect too.
            if not message or "\n" in message:
                raise AssertionError(f"bad error message {message!r} from {type(error).__name__}") from error

    args = [a for a in sys.argv if not a.startswith("--corpus")]
    if not any(not a.startswith("-") for a in args[1:]):
        args.append(str(corpus))  # libFuzzer reads (and grows) the first folder it is given
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()
