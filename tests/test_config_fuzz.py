"""
A configuration file's values, generated: every key given values of every
type TOML has (integers of any size, floats with inf and nan, strings of
any characters, booleans, dates and times, arrays and tables, nested),
and whole files of several keys (their own values mostly, so that files
reach the checks of several settings together), read as C{twistd mailgate
--config} reads them at start.  A value is taken or refused with a
C{ValueError} saying why (the administrator's "key 'x': ..." line), a
file served or refused in one line with exit 78 (or twistd's usage
error), never another exception (a traceback at start).
"""

import datetime
import enum
import json

from hypothesis import event, given
from hypothesis import strategies as st

from twisted.python import usage

from mailgate import tap
from mailgate.config import SETTINGS
from fuzzing import fuzzSettings

FUZZ = fuzzSettings(400)

scalars = st.one_of(
    st.integers(),
    st.integers(-2, 100_000),
    st.floats(),
    st.booleans(),
    st.text(max_size=40),
    st.sampled_from(["", "0", "-1", "1e3", "10M", "1.5G", "never", "any", "none", "local", "127.0.0.1",
                     "::1/128", "tcp:0", "unix:/nonexistent/x", "sqlite:///x", "RS256", "0-1", "\x00", "é"]),
    st.datetimes(),
    st.dates(),
    st.times(),
    st.datetimes(timezones=st.just(datetime.timezone.utc)),
)
tomlValues = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@FUZZ
@given(st.sampled_from(SETTINGS), tomlValues)
def test_everyValueIsTakenOrRefusedWithAReason(setting, value):
    try:
        setting.fromTOML(value)
    except ValueError as e:
        assert str(e).strip(), (setting.name, value)


def _toml(value):
    """
    C{value} written as TOML (what the test's files hold).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return "[" + ", ".join(_toml(item) for item in value) + "]"


def _candidates(setting):
    """
    Values for C{setting}'s key: its own default and example (taken, most
    of them), and values of every type.
    """
    own = [v for v in (setting.default, setting.example) if v is not None and not isinstance(v, enum.Enum)]
    fileScalars = st.one_of(
        st.integers(-5, 100_000), st.integers(), st.floats(allow_nan=True), st.booleans(), st.text(max_size=30),
        st.sampled_from(["", "never", "any", "none", "local", "127.0.0.1/32", "tcp:0", "json", "text", "0"]),
        st.dates(),
    )
    values = st.one_of(fileScalars, st.lists(fileScalars, max_size=3))
    if own:
        # Mostly its own (so that files get past their keys to the checks
        # of several settings together), else anything.
        ownValues = st.sampled_from([list(v) if isinstance(v, tuple) else v for v in own])
        anything = values
        values = st.integers(0, 3).flatmap(lambda pick: anything if pick == 0 else ownValues)
    return values


settingValues = st.sampled_from(SETTINGS).flatmap(lambda s: st.tuples(st.just(s.name), _candidates(s)))


@FUZZ
@given(st.lists(settingValues, max_size=6, unique_by=lambda pair: pair[0]))
def test_aFileOfAnyValuesStartsOrIsRefusedInOneLine(tmp_path_factory, pairs):
    """
    The file as twistd mailgate reads it at start (its cross-setting
    checks too): served, or refused with a line of its own (exit 78, or
    twistd's usage error), never a traceback.
    """
    path = tmp_path_factory.mktemp("config") / "mailgate.toml"
    path.write_text("".join(f"{name} = {_toml(value)}\n" for name, value in pairs), encoding="utf-8")
    path.chmod(0o600)
    options = tap.Options()
    try:
        options.parseOptions(["--config", str(path)])
        event("served")
    except tap.ConfigurationRefused as e:
        event("refused in its keys" if ": key " in e.message else "refused as a whole")
        assert e.code == 78
        assert e.message.startswith("mailgate: ") and "\n" not in e.message, e.message
    except usage.UsageError as e:
        assert str(e).strip() and "Traceback" not in str(e)
