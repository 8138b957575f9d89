# -*- test-case-name: tests.test_uidlformat -*-
"""
Dovecot's C{pop3_uidl_format}, in both of its spellings, so that a
maildir imported from Dovecot keeps the unique ids Dovecot served.

  - Dovecot 2.3 and earlier: C{%} variables, C{%08Xu%08Xv} (the default):
    C{%[-][0][width][.[0][-]width]}, modifiers C{L U X R M T}, one-letter
    variables C{u v m f g} or C{%{long}} names, C{%%}.
  - Dovecot 2.4: C{%{variable | filter | filter ...}},
    C{%{uid | hex(8)}%{uidvalidity | hex(8)}} (the default), filters with
    arguments and arithmetic, every other C{%} as it is, C{%%{} for a
    C{%{} of text.  Told apart by its expressions: a format with a
    C{%{...}} that is more than a bare long name (C{%{uid}}, which reads
    the same in both) is 2.4's.

The variables are the same in both: C{uid} (C{%u}), C{uidvalidity}
(C{%v}), C{md5} (C{%m}, the header's MD5 in hex), C{filename} (C{%f}) and
C{guid} (C{%g}).  Dovecot 2.4's filters that a UIDL format can use are
implemented as Dovecot's own code and tests define them (lowercase hex,
C{hex(8)} keeping the last eight digits, a hash's binary result written
in hex, C{substr}'s bounds); those about users, directories and
encryption (C{if}, C{regexp}, C{index}, C{username}, C{domain},
C{list}, C{ldap_dn}, C{encrypt}, ...) are refused by name.
"""

import base64
import functools
import hashlib
import re

from mailgate.importers import MAX_UIDL

#: Dovecot's variables by their long names (2.4's only names), with 2.3's
#: letters, the keys of the values given to L{formatUidl}.
VARIABLES = {"uid": "u", "uidvalidity": "v", "md5": "m", "filename": "f", "guid": "g"}

#: the most rounds a hash filter may ask for (a format runs once a message)
MAX_ROUNDS = 10000


def formatUidl(template, variables):
    """
    Expand C{template}, a Dovecot C{pop3_uidl_format} of either spelling.

    @param variables: the values by 2.3's letters (C{u v m f g}), as text;
        C{None} for one this message does not have.
    @raise ValueError: a malformed format, or one this message's values
        cannot be put through (a variable it has no value for, a filter
        refusing its input).
    """
    if isDovecot24(template):
        return _compile24(template).expand(variables)
    return _format23(template, variables)


def checkUidlFormat(template):
    """
    Refuse a malformed format before any message is read.

    @raise ValueError: saying what is wrong.
    """
    if isDovecot24(template):
        _compile24(template)
    else:
        _format23(template, {letter: "1" for letter in VARIABLES.values()})
    if not any(usesVariable(template, letter) for letter in VARIABLES.values()):
        # An empty one (an unset shell variable) or text alone: the same
        # id for every message, which failed each message but the first
        # (an empty one, every message) once the import was under way.
        raise ValueError(
            "it names no variable, so every message would get the same unique id (Dovecot's default is "
            "%08Xu%08Xv)"
        )


def usesVariable(template, letter):
    """
    Whether a format refers to the variable of 2.3's letter C{letter}.
    """
    if isDovecot24(template):
        return letter in _compile24(template).letters
    try:
        _format23(template, {k: "0" for k in VARIABLES.values() if k != letter})
    except ValueError:
        return True
    return False


def isDovecot24(template):
    """
    Whether C{template} is spelled as Dovecot 2.4 spells its formats.
    """
    i, n = 0, len(template)
    while i < n:
        if template.startswith("%%", i):
            i += 2
        elif template.startswith("%{", i):
            end = template.find("}", i)
            if end < 0 or template[i + 2:end] not in VARIABLES:
                return True
            i = end + 1
        else:
            i += 1
    return False


# -- Dovecot 2.3 -------------------------------------------------------------

_MODIFIERS = "LUXRMT"


def _modify(modifier, value):
    if modifier == "L":
        return value.lower()
    if modifier == "U":
        return value.upper()
    if modifier == "X":
        try:
            return f"{int(value):x}"
        except ValueError:
            return "0"
    if modifier == "R":
        return value[::-1]
    if modifier == "M":
        return hashlib.md5(value.encode("utf-8", "surrogateescape")).hexdigest()
    if modifier == "T":
        return value.rstrip()
    raise AssertionError(modifier)


def _format23(template, variables):
    out = []
    i, n = 0, len(template)
    while i < n:
        ch = template[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        i += 1
        sign, zero, width, offset = 1, False, 0, 0
        if i < n and template[i] == "-":
            sign, i = -1, i + 1
        if i < n and template[i] == "0":
            zero, i = True, i + 1
        while i < n and template[i].isdigit():
            width, i = width * 10 + int(template[i]), i + 1
        if i < n and template[i] == ".":
            offset, sign, width, i = sign * width, 1, 0, i + 1
            zero = False
            if i < n and template[i] == "0":
                zero, i = True, i + 1
            if i < n and template[i] == "-":
                sign, i = -1, i + 1
            while i < n and template[i].isdigit():
                width, i = width * 10 + int(template[i]), i + 1
            width *= sign
        if width > MAX_UIDL:
            # Padded to it, one id would take that much memory (a typo's
            # extra digits: gigabytes), for an id too long to import.
            raise ValueError(f"a width of {width} is over {MAX_UIDL}, the longest unique id")
        modifiers = []
        while i < n and template[i] in _MODIFIERS:
            modifiers.append(template[i])
            i += 1
        if i >= n:
            break
        if template[i] == "%":
            value = "%"
            i += 1
        else:
            if template[i] == "{":
                end = template.find("}", i)
                if end < 0:
                    raise ValueError(f"unterminated %{{ in {template!r}")
                key = VARIABLES.get(template[i + 1:end])
                name = "{" + template[i + 1:end] + "}"
                i = end + 1
            else:
                key = name = template[i]
                i += 1
            if key not in VARIABLES.values():
                raise ValueError(_unknown23(name))
            if key not in variables or variables[key] is None:
                raise ValueError(f"%{name} is not available here")
            value = variables[key]
        for modifier in modifiers:
            value = _modify(modifier, value)
        if offset < 0:
            if len(value) > -offset:
                value = value[len(value) + offset:]
        elif offset > 0:
            value = value[offset:]
        if width == 0:
            out.append(value)
        elif not zero:
            if width < 0:
                width = len(value) + width
            out.append(value[:max(width, 0)])
        else:
            out.append(value.rjust(width, "0"))
    return "".join(out)


#: Dovecot 2.3's modifiers that no unique id format needs, not computed
#: here: hashes of its own (C{H}, C{N}), an LDAP DN (C{D}), SQL escaping
#: (C{E}).
_UNCOMPUTED_MODIFIERS = "HNDE"


def _unknown23(name):
    """
    Why C{%name} is refused in a 2.3 format: a modifier of Dovecot's that
    is not computed here, or no variable at all.  (Before, each was "not
    available here", as though the maildir lacked a value it should have.)
    """
    if name in _UNCOMPUTED_MODIFIERS:
        return (
            f"Dovecot's modifier {name} (%{name}) is not one the import computes: it takes L, U, X, R, M, T and "
            f"widths"
        )
    return f"%{name} is no variable of pop3_uidl_format (Dovecot's are %u, %v, %f, %g and %m)"


# -- Dovecot 2.4: reading a format ---------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<number>[0-9]+)
      | (?P<quote>['"])
      | (?P<punct>[|(),=+\-*/%}:])
    )""",
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "0": "\0"}


class _Reader:
    """
    The tokens of one C{%{...}} expression, read from C{template} at
    C{position} (just after the C{%{}) to its closing brace.
    """

    def __init__(self, template, position):
        self.template = template
        self.position = position
        self._peeked = None

    def _error(self, why):
        return ValueError(f"{why} at offset {self.position} of {self.template!r}")

    def peek(self):
        if self._peeked is None:
            self._peeked = self._read()
        return self._peeked

    def next(self):
        token = self.peek()
        self._peeked = None
        return token

    def _read(self):
        match = _TOKEN.match(self.template, self.position)
        if match is None:
            if self.template[self.position:].strip() == "":
                raise self._error("unterminated %{")
            raise self._error(f"unexpected {self.template[self.position:].lstrip()[:1]!r}")
        self.position = match.end()
        if match.group("name") is not None:
            return ("name", match.group("name"))
        if match.group("number") is not None:
            return ("number", int(match.group("number")))
        if match.group("quote") is not None:
            return ("value", self._quoted(match.group("quote")))
        return ("punct", match.group("punct"))

    def _quoted(self, quote):
        out = []
        template, i = self.template, self.position
        while i < len(template):
            ch = template[i]
            if ch == "\\" and i + 1 < len(template):
                out.append(_ESCAPES.get(template[i + 1], template[i + 1]))
                i += 2
            elif ch == quote:
                self.position = i + 1
                return "".join(out)
            else:
                out.append(ch)
                i += 1
        self.position = i
        raise self._error("unterminated string")

    def expect(self, punct):
        kind, value = self.next()
        if (kind, value) != ("punct", punct):
            raise self._error(f"{punct!r} expected, not {value!r}")


def _readArgument(reader):
    """
    One argument of a filter: C{(key, kind, value)}, C{key} C{None} for a
    positional one, C{kind} C{value} (a quoted string), C{number} or
    C{name} (a variable).
    """
    kind, value = reader.next()
    key = None
    if kind == "name" and reader.peek() == ("punct", "="):
        reader.next()
        key = value
        kind, value = reader.next()
    if (kind, value) == ("punct", "-"):
        kind, value = reader.next()
        if kind != "number":
            raise reader._error("a number expected after '-'")
        value = -value
    if kind not in ("value", "number", "name"):
        raise reader._error(f"unexpected {value!r} in a filter's arguments")
    return (key, kind, value)


def _readStage(reader):
    """
    One filter of a pipeline and the arithmetic after it: C{(name,
    arguments, operations)}.
    """
    kind, name = reader.next()
    if kind != "name":
        raise reader._error(f"a variable or filter name expected, not {name!r}")
    if reader.peek() == ("punct", ":"):
        raise reader._error(f"%{{{name}:...}} (a Dovecot provider) has no value when importing")
    arguments = []
    if reader.peek() == ("punct", "("):
        reader.next()
        if reader.peek() != ("punct", ")"):
            arguments.append(_readArgument(reader))
            while reader.peek() == ("punct", ","):
                reader.next()
                arguments.append(_readArgument(reader))
        reader.expect(")")
    operations = []
    while reader.peek()[0] == "punct" and reader.peek()[1] in "+-*/%":
        operator = reader.next()[1]
        operand = _readArgument(reader)
        if operand[0] is not None or operand[1] == "value":
            raise reader._error(f"a number or a variable expected after {operator!r}")
        operations.append((operator, operand))
    return (name, arguments, operations)


def _readPipeline(reader):
    stages = [_readStage(reader)]
    while True:
        kind, value = reader.next()
        if (kind, value) == ("punct", "}"):
            return stages
        if (kind, value) != ("punct", "|"):
            raise reader._error(f"'|' or '}}' expected, not {value!r}")
        stages.append(_readStage(reader))


class _Program:
    """
    A Dovecot 2.4 format, read: its text and its expressions in order.

    @ivar letters: the variables it refers to, by 2.3's letters.
    """

    def __init__(self, parts):
        self.parts = parts
        self.letters = set()
        for part in parts:
            if isinstance(part, list):
                self.letters |= _referredTo(part)

    def expand(self, variables):
        return "".join(part if isinstance(part, str) else _run(part, variables) for part in self.parts)


@functools.lru_cache(maxsize=32)
def _compile24(template):
    """
    Read a Dovecot 2.4 format (cached: it is expanded once a message).

    @raise ValueError: a malformed one, or one with a filter mailgate does
        not have.
    """
    parts = []
    text = []
    i, n = 0, len(template)
    while i < n:
        if template.startswith("%%{", i):
            text.append("%{")
            i += 3
        elif template.startswith("%{", i):
            reader = _Reader(template, i + 2)
            stages = _readPipeline(reader)
            _checkStages(stages)
            if text:
                parts.append("".join(text))
                text = []
            parts.append(stages)
            i = reader.position
        else:
            text.append(template[i])
            i += 1
    if text:
        parts.append("".join(text))
    return _Program(parts)


def _checkStages(stages):
    for index, (name, arguments, _) in enumerate(stages):
        if index == 0 and name in VARIABLES:
            continue
        if name in _REFUSED:
            raise ValueError(f"Dovecot's {name!r} filter has no meaning for a unique id here")
        if name not in _FILTERS:
            if index == 0:
                raise ValueError(f"unknown variable %{{{name}}}: Dovecot's are {', '.join(VARIABLES)}")
            raise ValueError(f"no such filter {name!r}")
        for key, _, _ in arguments:
            if key is not None and key not in _KEYS.get(name, ()):
                raise ValueError(f"{name}: unsupported key {key!r}")
        # Sizes written out as numbers are judged now, not at each message.
        for key, kind, value in arguments:
            if kind != "number":
                continue
            if key is None and name in ("hex", "hexlify", "lfill", "rfill"):
                _bounded(value, f"{name}: a width of")
            elif key == "rounds" and not 0 <= value <= MAX_ROUNDS:
                raise ValueError(f"{name}: rounds must be from 0 to {MAX_ROUNDS}")


def _referredTo(stages):
    """
    The variables (2.3's letters) an expression may read.
    """
    letters = set()
    first = stages[0][0]
    if first in VARIABLES:
        letters.add(VARIABLES[first])
    for name, arguments, operations in stages:
        for _, kind, value in arguments + [operand for _, operand in operations]:
            if kind == "name" and value in VARIABLES:
                letters.add(VARIABLES[value])
            if name == "lookup" and kind == "value" and value in VARIABLES:
                letters.add(VARIABLES[value])
    return letters


# -- Dovecot 2.4: running a format ---------------------------------------------


class _State:
    """
    The value going through a pipeline: octets, or C{None} while there is
    none; C{binary} when a filter made octets of no text (a hash), which
    are written in hex at the end.
    """

    def __init__(self, variables):
        self.variables = variables
        self.value = None
        self.binary = False

    def lookup(self, name):
        if name not in VARIABLES:
            raise ValueError(f"unknown variable {name!r}")
        value = self.variables.get(VARIABLES[name])
        if value is None:
            raise ValueError(f"%{{{name}}} is not available here")
        return value.encode("utf-8", "surrogateescape")

    def text(self, value):
        self.value, self.binary = value, False

    def octets(self, value):
        self.value, self.binary = value, True

    def needed(self, what):
        if self.value is None:
            raise ValueError(f"no value to {what}")
        return self.value


def _run(stages, variables):
    state = _State(variables)
    # As Dovecot: a filter that fails leaves no value and its error waits,
    # for a later default() to give a value; a second failure ends the
    # expression with the first error.
    delayed = None
    for index, (name, arguments, operations) in enumerate(stages):
        steps = [(name, lambda: _FILTERS[name](state, arguments))]
        if index == 0 and name in VARIABLES:
            steps = [(name, lambda: state.text(state.lookup(name)))]
        steps += [("calculate", functools.partial(_calculate, state, *operation)) for operation in operations]
        for what, step in steps:
            try:
                step()
            except ValueError as e:
                if delayed is not None:
                    raise ValueError(delayed) from None
                state.value = None
                delayed = f"{what}: {e}"
            else:
                delayed = None
    if state.value is None:
        raise ValueError(delayed or "no value")
    if state.binary:
        return state.value.hex()
    return state.value.decode("utf-8", "surrogateescape")


def _string(state, argument):
    """
    An argument as octets: a quoted string or a number as written, a
    variable's value.
    """
    _, kind, value = argument
    if kind == "name":
        return state.lookup(value)
    return str(value).encode("utf-8", "surrogateescape")


_INTEGER = re.compile(rb"-?[0-9]+\Z")


def _integer(octets, why):
    if not _INTEGER.match(octets):
        raise ValueError(why)
    return int(octets)


def _number(state, argument):
    _, kind, value = argument
    if kind == "number":
        return value
    text = _string(state, argument)
    return _integer(text, f"{text.decode('utf-8', 'replace')!r} is not a number")


def _positional(name, arguments, most, least=0):
    positional = [a for a in arguments if a[0] is None]
    if len(positional) > most:
        raise ValueError("too many positional parameters")
    if len(positional) < least:
        raise ValueError("missing parameters")
    return positional


def _keyed(arguments):
    return {a[0]: a for a in arguments if a[0] is not None}


def _bounded(width, what):
    if abs(width) > MAX_UIDL:
        raise ValueError(f"{what} {width} is over {MAX_UIDL}, the longest unique id")
    return width


def _unsigned(octets, base):
    digits = "0123456789" if base == 10 else "0123456789abcdefABCDEF"
    text = octets.decode("latin-1")
    if not text or any(c not in digits for c in text):
        raise ValueError("input is not a number" if base == 10 else "input is not a hex number")
    number = int(text, base)
    if number >= 1 << 64:
        raise ValueError("input is out of range")
    return number


def _lookupFilter(state, arguments):
    [argument] = _positional("lookup", arguments, 1, 1)
    state.text(state.lookup(_string(state, argument).decode("utf-8", "surrogateescape")))


def _literal(state, arguments):
    [argument] = _positional("literal", arguments, 1, 1)
    state.text(_string(state, argument))


def _default(state, arguments):
    if state.value:
        return
    positional = _positional("default", arguments, 1)
    state.text(_string(state, positional[0]) if positional else b"")


def _concat(state, arguments):
    positional = _positional("concat", arguments, len(arguments), 1)
    value = state.value or b""
    for argument in positional:
        value += _string(state, argument)
    state.value = value


def _upper(state, arguments):
    _positional("upper", arguments, 0)
    state.value = state.needed("upper").upper()


def _lower(state, arguments):
    _positional("lower", arguments, 0)
    state.value = state.needed("lower").lower()


def _hashing(algorithm):
    def hashFilter(state, arguments):
        _positional(algorithm, arguments, 0)
        keyed = _keyed(arguments)
        rounds = _number(state, keyed["rounds"]) if "rounds" in keyed else 1
        if not 0 <= rounds <= MAX_ROUNDS:
            raise ValueError(f"rounds must be from 0 to {MAX_ROUNDS}")
        salt = _string(state, keyed["salt"]) if "salt" in keyed else b""
        value = state.needed(algorithm)
        for _ in range(rounds):
            value = hashlib.new(algorithm, salt + value).digest()
        state.octets(value)

    return hashFilter


def _hex(state, arguments):
    positional = _positional("hex", arguments, 1)
    width = _bounded(_number(state, positional[0]), "a width of") if positional else 0
    digits = b"%x" % _unsigned(state.needed("hex"), 10)
    if width < 0:
        digits = digits.ljust(-width, b"0")[:-width]
    elif width > 0:
        digits = digits.rjust(width, b"0")[-width:]
    # The value keeps its kind, as Dovecot's hex() does.
    state.value = digits


def _unhex(state, arguments):
    _positional("unhex", arguments, 0)
    state.text(b"%d" % _unsigned(state.needed("unhex"), 16))


def _hexlify(state, arguments):
    positional = _positional("hexlify", arguments, 1)
    width = _bounded(_number(state, positional[0]), "a width of") if positional else 0
    if width < 0:
        raise ValueError("width must be positive")
    digits = state.needed("hexlify").hex().encode("ascii")
    if width:
        digits = digits.rjust(width, b"0")[:width]
    state.text(digits)


def _unhexlify(state, arguments):
    _positional("unhexlify", arguments, 0)
    try:
        state.octets(bytes.fromhex(state.needed("unhexlify").decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("not a hex value") from None


def _reverse(state, arguments):
    _positional("reverse", arguments, 0)
    state.value = state.needed("reverse")[::-1]


def _truncate(state, arguments):
    positional = _positional("truncate", arguments, 1)
    keyed = _keyed(arguments)
    if "bits" in keyed:
        bits = _number(state, keyed["bits"])
        if bits < 0:
            raise ValueError("value out of bounds")
        value = state.needed("truncate")
        if bits < 8 * len(value):
            # The first C{bits} bits, as a number of as many octets as
            # they span, shifted to the right (Dovecot's
            # buffer_truncate_rshift_bits).
            size = (bits + 7) // 8
            number = int.from_bytes(value[:size], "big") >> (8 * size - bits)
            value = number.to_bytes(size, "big")
        state.value = value
        return
    if not positional:
        raise ValueError("missing truncation length")
    length = _number(state, positional[0])
    if length < 0:
        raise ValueError("value out of bounds")
    state.value = state.needed("truncate")[:length]


def _substr(state, arguments):
    positional = _positional("substr", arguments, 2, 1)
    offset = _number(state, positional[0])
    value = state.needed("substring")
    size = len(value)
    hasLength = len(positional) > 1
    length = _number(state, positional[1]) if hasLength else size
    if not -size <= offset <= size:
        raise ValueError("offset out of bounds")
    if not -size <= length <= size:
        raise ValueError("length out of bounds")
    if length == 0:
        state.value = b""
        return
    if offset < 0:
        offset += size
    if not hasLength:
        length = size - offset
    elif length < 0:
        # A negative length leaves that many octets off the end.
        length += size
        if length < offset:
            raise ValueError("length out of bounds")
        length -= offset
    if length < 0 or offset + length > size:
        raise ValueError("length out of bounds")
    state.value = value[offset:offset + length]


def _filling(left):
    def fillFilter(state, arguments):
        positional = _positional("lfill" if left else "rfill", arguments, 2, 1)
        amount = _bounded(_number(state, positional[0]), "a fill length of")
        if amount < 1:
            raise ValueError("fill length out of bounds")
        filler = _string(state, positional[1]) if len(positional) > 1 else b"0"
        value = state.needed("fill")
        if not filler and len(value) < amount:
            raise ValueError("an empty filler")
        while len(value) < amount:
            value = filler + value if left else value + filler
        state.value = value

    return fillFilter


def _text(state, arguments):
    _positional("text", arguments, 0)
    text = state.needed("text").decode("utf-8", "replace")
    state.text("".join("?" if ord(c) < 0x20 or c == "\x7f" else c for c in text).encode("utf-8"))


def _flag(state, argument):
    if argument[1] == "value":
        return argument[2].lower() in ("yes", "true", "1")
    return bool(_number(state, argument))


def _base64(state, arguments):
    _positional("base64", arguments, 0)
    keyed = _keyed(arguments)
    value = state.needed("base64")
    url = "url" in keyed and _flag(state, keyed["url"])
    encoded = base64.urlsafe_b64encode(value) if url else base64.b64encode(value)
    if "pad" in keyed and not _flag(state, keyed["pad"]):
        encoded = encoded.rstrip(b"=")
    state.text(encoded)


def _calculate(state, operator, operand):
    right = _number(state, operand)
    value = state.needed("calculate")
    if state.binary and operator == "%":
        # Octets of no text: their last eight as a number, for a modulo.
        if right <= 0:
            raise ValueError("binary modulo must be positive integer")
        state.text(b"%d" % (int.from_bytes(value[-8:], "big") % right))
        return
    left = _integer(value, "input is not a number")
    if operator in "/%" and right == 0:
        raise ValueError("division by zero" if operator == "/" else "modulo by zero")
    if operator == "+":
        result = left + right
    elif operator == "-":
        result = left - right
    elif operator == "*":
        result = left * right
    else:
        # C's division and remainder: toward zero.
        quotient = abs(left) // abs(right) * (1 if (left < 0) == (right < 0) else -1)
        result = quotient if operator == "/" else left - quotient * right
    state.text(b"%d" % result)


_FILTERS = {
    "lookup": _lookupFilter,
    "literal": _literal,
    "default": _default,
    "concat": _concat,
    "upper": _upper,
    "lower": _lower,
    "md5": _hashing("md5"),
    "sha1": _hashing("sha1"),
    "sha256": _hashing("sha256"),
    "sha384": _hashing("sha384"),
    "sha512": _hashing("sha512"),
    "hex": _hex,
    "unhex": _unhex,
    "hexlify": _hexlify,
    "unhexlify": _unhexlify,
    "reverse": _reverse,
    "truncate": _truncate,
    "substr": _substr,
    "lfill": _filling(True),
    "rfill": _filling(False),
    "text": _text,
    "base64": _base64,
}
_KEYS = {name: ("rounds", "salt") for name in ("md5", "sha1", "sha256", "sha384", "sha512")}
_KEYS.update({"truncate": ("bits",), "base64": ("pad", "url")})
#: Dovecot 2.4's filters about users, directories, lists and encryption.
_REFUSED = frozenset(
    ["if", "regexp", "index", "username", "domain", "list", "ldap_dn", "encrypt", "decrypt",
     "lenumber", "benumber", "unbase64", "hash", "calculate"]
)
