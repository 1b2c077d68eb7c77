"""User-facing errors: one line naming the file or key and what was expected; the CLI exits 2."""


class BenchmarkError(Exception):
    """Bad input from the user (protocol, data, weights); printed as one line, exit status 2."""


class WeightsUnavailableError(BenchmarkError):
    """Pretrained weights are not on this machine."""


class PreflightError(BenchmarkError):
    """Every fault found before a run starts (data layout, weights), one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(dict.fromkeys(problems))
        super().__init__("\n".join(self.problems))


class Interrupted(BaseException):
    """The process was asked to stop (SIGTERM, as a cluster scheduler sends); raised like KeyboardInterrupt."""

    exit_code = 143
