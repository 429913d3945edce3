"""The project's one error base class and its few specialisations.

Every error a user can cause (bad flag, bad path, wrong model, corrupt store) is a
``ClipscopeError`` with a one-line message that names the thing at fault; the CLI turns it
into that line on stderr and exit code 2 (4 for an ``EnvironmentFault``: the machine, not the
input, is at fault; README lists every exit code).
"""


class ClipscopeError(Exception):
    """Base class for every error clipscope raises on bad input or state.

    ``parameters`` names the Python parameters the message speaks of; the message is then a template
    with a ``{name}`` field for each (literal braces doubled). ``str(err)`` fills in the parameter
    names (what a Python caller typed); ``err.message_for(flags)`` the command-line flags the CLI
    maps them to, so one error reads right in both worlds.
    """

    def __init__(self, *args, parameters: tuple[str, ...] = ()):
        self.parameters = tuple(parameters)
        self.template = None
        if self.parameters and len(args) == 1 and isinstance(args[0], str):
            self.template = args[0]
            args = (self.template.format(**{p: p for p in self.parameters}),)
        super().__init__(*args)

    def __reduce__(self):
        # Rebuilt without calling __init__ (subclasses take other arguments), e.g. across Ray.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))

    def message_for(self, names: dict[str, str]) -> str:
        """The message with each parameter replaced by ``names[parameter]`` (kept when not mapped)."""
        if self.template is None:
            return str(self)
        return self.template.format(**{p: names.get(p, p) for p in self.parameters})


class ConfigError(ClipscopeError, ValueError):
    """A parameter or flag has an invalid value."""


class ParameterError(ConfigError):
    """One parameter has an invalid value: ``ParameterError("basis_size", "must be an integer ≥ 1, got 0")``
    reads "basis_size must be …" from Python and "--basis-size must be …" from the CLI."""

    def __init__(self, parameter: str, requirement: str):
        self.parameter = parameter
        super().__init__("{%s} %s" % (parameter, requirement.replace("{", "{{").replace("}", "}}")),
                         parameters=(parameter,))


class ModelError(ClipscopeError):
    """A model cannot be loaded or is not a supported architecture."""


class StoreError(ClipscopeError):
    """A store is missing, locked, corrupt or incompatible with the run."""


class DataError(ClipscopeError):
    """Input data (shards, URLs, sample indexes) cannot be read."""


class EnvironmentFault(ClipscopeError):
    """The machine failed, not the input: disk full, read-only file system, no permission, no
    network. The CLI exits 4 on it (2 on every other ClipscopeError)."""


def literal(value: object) -> str:
    """``value`` as text a message template keeps verbatim (its braces doubled): a path, a repr or another
    error's text interpolated into a template with ``parameters``."""
    return str(value).replace("{", "{{").replace("}", "}}")


def _rebuild(cls: type, args: tuple, state: dict) -> ClipscopeError:
    err = Exception.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err
