"""
The benchmark suite's report: rows aggregated over interleaved rounds,
the side-by-side comparison with Dovecot (ratios, targets, verdicts), and
the tables C{run.py} prints and writes.  No measuring here: every function
takes plain dicts, so the arithmetic can be tested on synthetic rows.

A row (one measurement cell: server, backend, credentials, transport,
login, scenario, concurrency) holds the medians of its per-round figures
(L{aggregate}); the ratios are ratios of those medians.
"""

import statistics

#: issue 15's targets: mailgate CPU per session / Dovecot hp's, at most
CPU_TARGETS = {"stat": 0.5, "list": 0.6, "top": 0.8, "fetchall": 0.8}
#: fetchall MB/s at 10 clients, mailgate / Dovecot hp, at least
THROUGHPUT_TARGET = 1.1
#: intake msgs/s, mailgate (LMTP and SMTP; LMTP by BDAT) / Dovecot LMTP (by BDAT), at least
INTAKE_TARGET = 2.0
#: mailgate on PostgreSQL / on SQLite, CPU per session (message), at most
POSTGRES_TARGET = 1.5
#: one-message RETR session p99 at one client, milliseconds, below
RETR1_P99_MS = 5.0
#: big maildrop login -> STAT, milliseconds, below
BIG_LOGIN_MS = 100.0

SCENARIO_ORDER = ("stat", "list", "top", "fetchall", "retr1", "newest", "pick", "limit")
TRANSPORTS = ("plain", "tls")
REFERENCE = "dovecot-hp"
#: Dovecot hp pinned to the CPUs mailgate was pinned to (run.py
#: --mailgate-cpus); where a run has it, each cell compares with the better
#: of the two Dovecots, marked "(p)" when it is this one.
PINNED_REFERENCE = "dovecot-hp-pinned"

WARM = (
    "warm credentials on both sides: mailgate's verified-login cache (default size, warmed by the "
    "verification pass), Dovecot {PLAIN} passwords with auth_cache_size = 1M, auth_cache_ttl = 1 hour"
)
COLD = (
    "cold credentials on both sides: mailgate --auth-cache-size 0 (scrypt at every login), "
    "Dovecot {SHA512-CRYPT} passwords with auth_cache_size = 0"
)
DOVECOT_HP = (
    "Dovecot hp: service pop3-login { service_count = 0; process_min_avail = 2; client_limit = 1000 }, "
    "service pop3 { service_count = 0; process_min_avail = 2 }, pop3_no_flag_updates = yes, "
    "mail_max_userip_connections = 1000, mail_fsync = always"
)

#: per-round fields that add up rather than take the median
_SUMMED = {"errors", "sessions", "messages", "bytesReceived", "acknowledged", "cpuSeconds", "clientCpuSeconds", "elapsed"}
#: per-round fields whose worst (largest) value is kept
_MAXED = {"peak", "backgroundCores"}


# -- aggregation ---------------------------------------------------------------------


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(results):
    """
    One row from the per-round C{asDict()}s of one measurement cell:
    medians of the figures, sums of the counts (errors, sessions, ...),
    the largest C{backgroundCores} and C{peak}, the error kinds and TLS
    versions merged, the intake verifications combined (ok only if every
    round's was), and C{perRound}: each round's rate, CPU, p99, errors
    and background cores.
    """
    if not results:
        raise ValueError("no results to aggregate")
    row = {}
    for key in results[0]:
        values = [r.get(key) for r in results]
        if key in ("errorKinds", "tlsVersions"):
            merged = {}
            for value in values:
                for k, n in (value or {}).items():
                    merged[k] = merged.get(k, 0) + n
            row[key] = merged
        elif key == "verification":
            reports = [v for v in values if v is not None]
            row[key] = None if not reports else {
                "ok": len(reports) == len(values) and all(v["ok"] for v in reports),
                "rounds": len(values),
                "verified": len(reports),
                "failed": [v for v in reports if not v["ok"]][:3],
            }
        elif key in _SUMMED:
            row[key] = None if any(v is None for v in values) else round(sum(values), 3)
        elif key in _MAXED:
            present = [v for v in values if v is not None]
            row[key] = max(present) if present else None
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None) and any(
            v is not None for v in values
        ):
            m = median(values)
            row[key] = round(m, 3) if isinstance(m, float) else m
        else:
            row[key] = values[0]
    intake = "messagesPerSecond" in results[0]
    row["rounds"] = len(results)
    row["perRound"] = [
        {
            "rate": r.get("messagesPerSecond" if intake else "sessionsPerSecond"),
            "cpuMs": r.get("cpuMsPerMessage" if intake else "cpuMsPerSession"),
            "p99ms": r.get("p99ms"),
            "errors": r.get("errors"),
            "bg": r.get("backgroundCores"),
        }
        for r in results
    ]
    return row


# -- looking rows up -------------------------------------------------------------------


def find(rows, **match):
    """
    The first row matching every given field, or C{None}.
    """
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def reference(rows, better, **where):
    """
    Dovecot hp's row for a cell: the better one, by C{better(row)} (larger
    is better; C{None} for no figure), of Dovecot as it runs and Dovecot
    pinned to mailgate's CPUs, where the run measured both; else the one
    there is.
    """
    candidates = [find(rows, server=name, **where) for name in (REFERENCE, PINNED_REFERENCE)]
    return _best(candidates, better) or candidates[0]


def _best(rows, better):
    """
    The row with the largest C{better(row)} among those that have one, or
    C{None}.
    """
    measured = [r for r in rows if r is not None and better(r) is not None]
    return max(measured, key=better) if measured else None


def _lowerCpu(row):
    value = cpu(row)
    return None if value is None else -value


def _pinnedMark(row):
    return " (p)" if row is not None and row.get("server") == PINNED_REFERENCE else ""


def cpu(row):
    """
    The server's CPU per session (per message for intake), or C{None}.
    """
    if row is None:
        return None
    return row.get("cpuMsPerMessage") if row["kind"] == "intake" else row.get("cpuMsPerSession")


def dbCpu(row):
    if row is None:
        return None
    return row.get("extraCpuMsPerMessage") if row["kind"] == "intake" else row.get("extraCpuMsPerSession")


def rate(row):
    if row is None:
        return None
    return row.get("messagesPerSecond") if row["kind"] == "intake" else row.get("sessionsPerSecond")


def ratio(a, b):
    return a / b if a is not None and b else None


def verdict(value, target, atLeast=False, errors=0):
    """
    C{"met"} / C{"NOT met"} for a ratio against a target (at most, or at
    least with C{atLeast}); C{"errors"} if the measurements had errors,
    C{"-"} without a figure or a target.
    """
    if value is None or target is None:
        return "-"
    if errors:
        return "errors"
    ok = value >= target if atLeast else value <= target
    return "met" if ok else "NOT met"


def _errors(*rows):
    return sum((r.get("errors") or 0) for r in rows if r is not None)


def _bg(*rows):
    values = [r.get("backgroundCores") for r in rows if r is not None and r.get("backgroundCores") is not None]
    return max(values) if values else None


def _concurrencies(rows):
    return sorted({r["concurrency"] for r in rows if r["kind"] == "pop3"})


def throughputConcurrency(rows):
    """
    The concurrency the MB/s comparison reads: 10, or the highest measured
    if there was no 10-client run (the quick run).
    """
    levels = _concurrencies(rows)
    if not levels:
        return None
    return 10 if 10 in levels else max(levels)


# -- the side-by-side comparison ----------------------------------------------------------


def pop3Cells(rows, credentials="warm"):
    """
    One cell per scenario x transport x concurrency measured: CPU ms per
    session of mailgate on SQLite and of Dovecot hp, their ratio against
    the scenario's target; mailgate on PostgreSQL (and the database's own
    CPU) against mailgate on SQLite.
    """
    base = dict(kind="pop3", login="USER/PASS", credentials=credentials)
    cells = []
    scenarios = [s for s in SCENARIO_ORDER if any(r.get("scenario") == s for r in rows if r["kind"] == "pop3")]
    for scenario in scenarios:
        for transport in TRANSPORTS:
            for concurrency in _concurrencies(rows):
                where = dict(base, scenario=scenario, transport=transport, concurrency=concurrency)
                mg = find(rows, server="mailgate", backend="sqlite", **where)
                dv = reference(rows, _lowerCpu, **where)
                pg = find(rows, server="mailgate", backend="postgres", **where)
                if mg is None and dv is None and pg is None:
                    continue
                target = CPU_TARGETS.get(scenario)
                r = ratio(cpu(mg), cpu(dv))
                pgRatio = ratio(cpu(pg), cpu(mg))
                pgTotal = None if cpu(pg) is None or dbCpu(pg) is None else cpu(pg) + dbCpu(pg)
                cells.append({
                    "scenario": scenario, "transport": transport, "concurrency": concurrency,
                    "mailgate": cpu(mg), "dovecot": cpu(dv), "dovecotMark": _pinnedMark(dv), "ratio": r, "target": target,
                    "verdict": verdict(r, target, errors=_errors(mg, dv)),
                    "postgres": cpu(pg), "postgresDb": dbCpu(pg),
                    "pgRatio": pgRatio, "pgTotalRatio": ratio(pgTotal, cpu(mg)),
                    "pgVerdict": verdict(pgRatio, POSTGRES_TARGET, errors=_errors(mg, pg)),
                    "mailgateRate": rate(mg), "dovecotRate": rate(dv), "postgresRate": rate(pg),
                    "bg": _bg(mg, dv, pg), "errors": _errors(mg, dv, pg),
                })
    return cells


def throughputCells(rows):
    """
    fetchall MB/s at 10 clients (L{throughputConcurrency}), plain and
    TLS: mailgate on SQLite (and PostgreSQL) against Dovecot hp.
    """
    concurrency = throughputConcurrency(rows)
    cells = []
    for transport in TRANSPORTS:
        where = dict(kind="pop3", login="USER/PASS", credentials="warm", scenario="fetchall",
                     transport=transport, concurrency=concurrency)
        mbs = lambda row: None if row is None else row.get("megabytesPerSecond")  # noqa: E731
        mg = find(rows, server="mailgate", backend="sqlite", **where)
        dv = reference(rows, mbs, **where)
        pg = find(rows, server="mailgate", backend="postgres", **where)
        if mg is None and dv is None:
            continue
        r = ratio(mbs(mg), mbs(dv))
        cells.append({
            "transport": transport, "concurrency": concurrency, "mailgate": mbs(mg), "dovecot": mbs(dv),
            "dovecotMark": _pinnedMark(dv),
            "postgres": mbs(pg), "ratio": r, "pgRatio": ratio(mbs(pg), mbs(dv)), "target": THROUGHPUT_TARGET,
            "verdict": verdict(r, THROUGHPUT_TARGET, atLeast=True, errors=_errors(mg, dv)),
            "bg": _bg(mg, dv, pg),
        })
    return cells


#: The intake measurements in the table's order: each one's name there,
#: and the Dovecot LMTP measurement it is compared with (the same way of
#: sending where Dovecot has it: its LMTP takes BDAT too, and has no SMTP).
INTAKE_ROWS = (("lmtp", "LMTP", "lmtp"), ("smtp", "SMTP", "lmtp"), ("lmtp-bdat", "LMTP BDAT", "lmtp-bdat"))
_INTAKE_NAMES = {scenario: name for scenario, name, _ in INTAKE_ROWS}
_INTAKE_AGAINST = {scenario: against for scenario, _, against in INTAKE_ROWS}


def _intakeRows(rows, scenario, servers, backend=None):
    """
    The intake rows of these servers (on this backend, if given) measured
    as C{scenario} ("lmtp", "smtp", "lmtp-bdat"; a row's scenario is that
    and the size, "lmtp 4KB"): matched whole, so that "lmtp" is not
    "lmtp-bdat".
    """
    return [r for r in rows if r["kind"] == "intake" and r["server"] in servers
            and r["scenario"].split()[0] == scenario and backend in (None, r["backend"])]


def intakeCells(rows):
    """
    Intake (LMTP and SMTP by DATA, LMTP by BDAT; mailgate on each backend)
    against Dovecot hp's LMTP: msgs/s ratio (target at least 2); CPU per
    message; on PostgreSQL, CPU per message against SQLite's for the same
    measurement.  DATA rows (LMTP and SMTP) are compared with Dovecot's
    LMTP by DATA, the BDAT row with Dovecot's LMTP by BDAT: like with like,
    and never one for the other (no Dovecot BDAT row, no ratio).
    """
    cells = []
    for backend in ("sqlite", "postgres"):
        for scenario, name, against in INTAKE_ROWS:
            mg = next(iter(_intakeRows(rows, scenario, ("mailgate",), backend)), None)
            if mg is None:
                continue
            dv = _best(_intakeRows(rows, against, (REFERENCE, PINNED_REFERENCE)), rate)
            sqlite = next(iter(_intakeRows(rows, scenario, ("mailgate",), "sqlite")), None)
            r = ratio(rate(mg), rate(dv))
            pgRatio = ratio(cpu(mg), cpu(sqlite)) if backend == "postgres" else None
            cells.append({
                "backend": backend, "protocol": name, "scenario": mg["scenario"],
                "dovecotProtocol": _INTAKE_NAMES[against],
                "sessions": mg["concurrency"], "rate": rate(mg), "dovecotRate": rate(dv),
                "dovecotMark": _pinnedMark(dv), "ratio": r,
                "target": INTAKE_TARGET, "verdict": verdict(r, INTAKE_TARGET, atLeast=True, errors=_errors(mg, dv)),
                "cpu": cpu(mg), "dovecotCpu": cpu(dv), "cpuRatio": ratio(cpu(mg), cpu(dv)),
                "pgRatio": pgRatio,
                "pgVerdict": verdict(pgRatio, POSTGRES_TARGET, errors=_errors(mg, sqlite)) if backend == "postgres" else "-",
                "verified": _verifiedMark(mg), "dovecotVerified": _verifiedMark(dv),
                "bg": _bg(mg, dv),
            })
    return cells


def _verifiedMark(row):
    if row is None or row.get("verification") is None:
        return "-"
    return "ok" if row["verification"]["ok"] else "FAILED"


def coldCells(rows):
    """
    The cold-login figure: the stat scenario with every login verifying
    the password hash on both sides, per concurrency; mailgate's warm
    figure beside it.
    """
    cells = []
    levels = sorted({r["concurrency"] for r in rows if r.get("credentials") == "cold" and r["kind"] == "pop3"})
    for concurrency in levels:
        where = dict(kind="pop3", login="USER/PASS", scenario="stat", transport="plain", concurrency=concurrency)
        mg = find(rows, server="mailgate", backend="sqlite", credentials="cold", **where)
        dv = find(rows, server=REFERENCE, credentials="cold", **where)
        warm = find(rows, server="mailgate", backend="sqlite", credentials="warm", **where)
        warmDv = find(rows, server=REFERENCE, credentials="warm", **where)
        cells.append({
            "concurrency": concurrency, "mailgate": cpu(mg), "dovecot": cpu(dv), "ratio": ratio(cpu(mg), cpu(dv)),
            "mailgateRate": rate(mg), "dovecotRate": rate(dv),
            "mailgateWarm": cpu(warm), "dovecotWarm": cpu(warmDv), "errors": _errors(mg, dv), "bg": _bg(mg, dv),
        })
    return cells


def bigCells(extra):
    """
    The big maildrop, side by side: mailgate on SQLite and PostgreSQL,
    Dovecot; login -> STAT, LIST and UIDL (medians), ratios to Dovecot.
    """
    dv = extra.get("big maildrop dovecot")
    cells = []
    for key, name in (("big maildrop", "mailgate/sqlite"), ("big maildrop postgres", "mailgate/postgres"),
                      ("big maildrop dovecot", "dovecot-hp/maildir")):
        big = extra.get(key)
        if not big:
            continue
        mine = key != "big maildrop dovecot"
        cells.append({
            "server": name, "messages": big["messages"], "loginToStatMs": big["loginToStatMs"],
            "uidlMs": big["uidlMs"], "listMs": big["listMs"], "firstMs": big["firstLoginToStatMs"],
            "octets": big.get("octets"), "sessions": big["sessions"], "ok": big["ok"],
            "statRatio": ratio(big["loginToStatMs"], dv["loginToStatMs"]) if mine and dv else None,
            "uidlRatio": ratio(big["uidlMs"], dv["uidlMs"]) if mine and dv else None,
            "indexSeconds": big.get("indexSeconds"),
        })
    return cells


# -- text ------------------------------------------------------------------------------


def fmt(value, digits=2, suffix=""):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def renderTable(columns, cells, markdown=False):
    """
    C{columns}: C{(key, title, left-aligned)}; C{cells}: dicts of strings.
    """
    if markdown:
        lines = ["| " + " | ".join(title for _, title, _ in columns) + " |"]
        lines.append("|" + "|".join("---" if left else "---:" for _, _, left in columns) + "|")
        for c in cells:
            lines.append("| " + " | ".join(c[key] for key, _, _ in columns) + " |")
        return "\n".join(lines)
    widths = {key: max([len(title)] + [len(c[key]) for c in cells]) for key, title, _ in columns}
    lines = ["  ".join(title.ljust(widths[key]) for key, title, _ in columns).rstrip()]
    lines.append("  ".join("-" * widths[key] for key, _, _ in columns))
    for c in cells:
        lines.append("  ".join(
            c[key].ljust(widths[key]) if left else c[key].rjust(widths[key]) for key, _, left in columns
        ).rstrip())
    return "\n".join(lines)


DETAIL_COLUMNS = (
    ("server", "server", True), ("backend", "backend", True), ("cred", "cred", True), ("transport", "transport", True),
    ("login", "login", True), ("scenario", "scenario", True), ("conc", "conc", False), ("rate", "sess/s", False),
    ("mbs", "MB/s", False), ("p50", "p50 ms", False), ("p99", "p99 ms", False), ("cpu", "CPU ms/sess", False),
    ("dbcpu", "+DB ms", False), ("client", "client CPU", False), ("bg", "bg cores", False),
    ("errors", "errors", False), ("xhp", "CPU x dv-hp", False),
)


def _verified(row):
    report = row.get("verification")
    if row["kind"] != "intake" or report is None:
        return ""
    if not report["ok"]:
        return " VERIFY-FAILED"
    return " ok" if row.get("acknowledged") else " (nothing delivered)"


def detailCells(rows):
    """
    Every row as strings, with mailgate's CPU against Dovecot hp's for the
    same cell (credentials, transport, login, scenario, concurrency).
    """
    out = []
    for row in rows:
        intake = row["kind"] == "intake"
        if intake:
            # Dovecot's LMTP sent to the same way (SMTP: by DATA, it has
            # no SMTP), as in the intake cells.
            scenario = row["scenario"].split()[0]
            ref = next(iter(_intakeRows(rows, _INTAKE_AGAINST.get(scenario, scenario), (REFERENCE,))), None)
        else:
            ref = find(rows, server=REFERENCE, kind=row["kind"], credentials=row.get("credentials"),
                       transport=row.get("transport"), login=row.get("login"), scenario=row["scenario"],
                       concurrency=row["concurrency"])
        x = ratio(cpu(row), cpu(ref)) if row["server"] != REFERENCE else None
        concurrency = str(row["concurrency"])
        if not intake and row.get("peak") and row["peak"] < row["concurrency"]:
            concurrency += f" ({row['peak']})"
        out.append({
            "server": row["server"], "backend": row["backend"], "cred": row.get("credentials") or "-",
            "transport": row.get("transport") or "plain", "login": row.get("login") or "-",
            "scenario": row["scenario"], "conc": concurrency, "rate": fmt(rate(row), 1),
            "mbs": "-" if intake else fmt(row.get("megabytesPerSecond"), 2),
            "p50": fmt(row.get("p50ms")), "p99": fmt(row.get("p99ms")), "cpu": fmt(cpu(row), 3),
            "dbcpu": fmt(dbCpu(row), 3) if dbCpu(row) else "-",
            "client": f"{row['clientCpuShare']:.0%}" if row.get("clientCpuShare") is not None else "-",
            "bg": fmt(row.get("backgroundCores"), 2), "errors": str(row.get("errors", 0)) + _verified(row),
            "xhp": fmt(x, 2),
        })
    return out


def detailTable(rows, markdown=False):
    return renderTable(DETAIL_COLUMNS, detailCells(rows), markdown)


def _target(value, atLeast=False):
    return "-" if value is None else f"{'>=' if atLeast else '<='}{value:g}"


POP3_COLUMNS = (
    ("scenario", "scenario", True), ("transport", "transport", True), ("conc", "clients", False),
    ("mailgate", "mailgate ms", False), ("dovecot", "Dovecot ms", False), ("ratio", "ratio", False),
    ("target", "target", False), ("verdict", "verdict", True), ("postgres", "PG ms (+DB)", False),
    ("pgRatio", "PG/SQLite (+DB)", False), ("pgVerdict", "<=1.5", True), ("bg", "bg cores", False),
)


def pop3Table(cells, markdown=False):
    strings = [{
        "scenario": c["scenario"], "transport": c["transport"], "conc": str(c["concurrency"]),
        "mailgate": fmt(c["mailgate"], 3), "dovecot": fmt(c["dovecot"], 3) + c["dovecotMark"], "ratio": fmt(c["ratio"]),
        "target": _target(c["target"]), "verdict": c["verdict"],
        "postgres": "-" if c["postgres"] is None else f"{c['postgres']:.3f} (+{fmt(c['postgresDb'], 3)})",
        "pgRatio": "-" if c["pgRatio"] is None else f"{c['pgRatio']:.2f} ({fmt(c['pgTotalRatio'])})",
        "pgVerdict": c["pgVerdict"], "bg": fmt(c["bg"]),
    } for c in cells]
    return renderTable(POP3_COLUMNS, strings, markdown)


THROUGHPUT_COLUMNS = (
    ("transport", "fetchall", True), ("conc", "clients", False), ("mailgate", "mailgate MB/s", False),
    ("dovecot", "Dovecot MB/s", False), ("ratio", "ratio", False), ("target", "target", False),
    ("verdict", "verdict", True), ("postgres", "PG MB/s", False), ("pgRatio", "PG ratio", False), ("bg", "bg cores", False),
)


def throughputTable(cells, markdown=False):
    strings = [{
        "transport": c["transport"], "conc": str(c["concurrency"]), "mailgate": fmt(c["mailgate"], 1),
        "dovecot": fmt(c["dovecot"], 1) + c["dovecotMark"], "ratio": fmt(c["ratio"]), "target": _target(c["target"], True),
        "verdict": c["verdict"], "postgres": fmt(c["postgres"], 1), "pgRatio": fmt(c["pgRatio"]), "bg": fmt(c["bg"]),
    } for c in cells]
    return renderTable(THROUGHPUT_COLUMNS, strings, markdown)


INTAKE_COLUMNS = (
    ("what", "intake", True), ("rate", "mailgate msgs/s", False), ("dovecotRate", "Dovecot LMTP msgs/s", False),
    ("ratio", "ratio", False), ("target", "target", False), ("verdict", "verdict", True),
    ("cpu", "CPU ms/msg (x Dovecot)", False), ("pgRatio", "PG/SQLite CPU", False), ("pgVerdict", "<=1.5", True),
    ("verified", "verified", True), ("bg", "bg cores", False),
)


def intakeTable(cells, markdown=False):
    strings = [{
        "what": f"mailgate/{c['backend']} {c['protocol']} {c['scenario'].split()[-1]} x{c['sessions']}",
        "rate": fmt(c["rate"], 0), "dovecotRate": fmt(c["dovecotRate"], 0) + c["dovecotMark"], "ratio": fmt(c["ratio"]),
        "target": _target(c["target"], True), "verdict": c["verdict"],
        "cpu": f"{fmt(c['cpu'], 3)} ({fmt(c['cpuRatio'])})", "pgRatio": fmt(c["pgRatio"]), "pgVerdict": c["pgVerdict"],
        "verified": f"{c['verified']}/{c['dovecotVerified']}", "bg": fmt(c["bg"]),
    } for c in cells]
    return renderTable(INTAKE_COLUMNS, strings, markdown)


COLD_COLUMNS = (
    ("conc", "stat, clients", False), ("mailgate", "mailgate cold ms", False), ("dovecot", "Dovecot cold ms", False),
    ("ratio", "ratio", False), ("rates", "sess/s mailgate/Dovecot", False),
    ("warm", "warm ms mailgate/Dovecot", False), ("bg", "bg cores", False), ("errors", "errors", False),
)


def coldTable(cells, markdown=False):
    strings = [{
        "conc": str(c["concurrency"]), "mailgate": fmt(c["mailgate"], 3), "dovecot": fmt(c["dovecot"], 3),
        "ratio": fmt(c["ratio"]), "rates": f"{fmt(c['mailgateRate'], 1)}/{fmt(c['dovecotRate'], 1)}",
        "warm": f"{fmt(c['mailgateWarm'], 3)}/{fmt(c['dovecotWarm'], 3)}", "bg": fmt(c["bg"]), "errors": str(c["errors"]),
    } for c in cells]
    return renderTable(COLD_COLUMNS, strings, markdown)


BIG_COLUMNS = (
    ("server", "maildrop", True), ("messages", "messages", False), ("stat", "login->STAT ms", False),
    ("statRatio", "x Dovecot", False), ("uidl", "UIDL ms", False), ("uidlRatio", "x Dovecot", False),
    ("list", "LIST ms", False), ("first", "first login->STAT ms", False), ("octets", "STAT octets", False),
    ("ok", "ok", True),
)


def bigTable(cells, markdown=False):
    strings = [{
        "server": c["server"], "messages": str(c["messages"]), "stat": fmt(c["loginToStatMs"]),
        "statRatio": fmt(c["statRatio"]), "uidl": fmt(c["uidlMs"]), "uidlRatio": fmt(c["uidlRatio"]),
        "list": fmt(c["listMs"]),
        "first": fmt(c["firstMs"]) + (f" (index {c['indexSeconds']:.1f} s)" if c.get("indexSeconds") is not None else ""),
        "octets": fmt(c["octets"]), "ok": str(c["ok"]),
    } for c in cells]
    return renderTable(BIG_COLUMNS, strings, markdown)


def idleText(extra):
    return "\n\n".join(
        text for text in (_idleText(extra.get("idle sessions"), ""), _idleText(extra.get("idle sessions tls"), " over TLS"))
        if text
    )


def _afterTrim(idle):
    if idle.get("rssAfterTrimMiB") is None:
        return ""
    return f", after the next memory trim {idle['rssAfterTrimMiB']} MiB"


def _idleText(idle, how):
    if not idle:
        return ""
    return (
        f"{idle['sessions']} idle POP3 sessions{how} (one mailgate process, SQLite): RSS baseline "
        f"{idle['rssBaselineMiB']} MiB, greeted {idle.get('rssGreetedMiB')} MiB, logged in (APOP) "
        f"{idle.get('rssLoggedInMiB')} MiB ({idle.get('rssPerSessionKiB')} KiB/session), 1 s after close "
        f"{idle.get('rssAfterCloseMiB')} MiB{_afterTrim(idle)}; logged in {idle.get('loggedIn')}, failures "
        f"{idle.get('failures')}; an active client's stat sessions p50/p99 "
        f"{idle['probeWithoutIdle']['p50ms']}/{idle['probeWithoutIdle']['p99ms']} ms without, "
        f"{idle.get('probeWithIdle', {}).get('p50ms')}/{idle.get('probeWithIdle', {}).get('p99ms')} ms "
        f"with the idle sessions (errors {idle.get('probeWithIdle', {}).get('errors')})"
    )


def sideBySide(rows, extra, markdown=False):
    """
    The comparison tables, each with a heading line.
    """
    heading = (lambda text: f"\n**{text}**\n") if markdown else (lambda text: f"\n{text}")
    rounds = max((r.get("rounds") or 0 for r in rows), default=0)
    parts = []
    cells = pop3Cells(rows)
    if cells:
        parts.append(heading(
            f"POP3, server CPU ms per session, mailgate/sqlite / Dovecot hp (medians of {rounds} interleaved "
            f"rounds; {WARM}); PG = mailgate/postgres, its CPU / mailgate/sqlite's (with PostgreSQL's own CPU)"
        ))
        parts.append(pop3Table(cells, markdown))
    cells = throughputCells(rows)
    if cells:
        parts.append(heading("fetchall throughput, MB/s (same rounds)"))
        parts.append(throughputTable(cells, markdown))
    cells = intakeCells(rows)
    if cells:
        parts.append(heading(
            "Intake, msgs/s against Dovecot hp's LMTP (same rounds; the BDAT row against Dovecot's LMTP by BDAT)"
        ))
        parts.append(intakeTable(cells, markdown))
    cells = coldCells(rows)
    if cells:
        parts.append(heading(f"Cold logins (informative, not a target; {COLD})"))
        parts.append(coldTable(cells, markdown))
    cells = bigCells(extra)
    if cells:
        parts.append(heading(
            "Big maildrop, one user (medians of the sessions after a first one; Dovecot's maildir "
            "indexed by an untimed first login)"
        ))
        parts.append(bigTable(cells, markdown))
    idle = idleText(extra)
    if idle:
        parts.append(heading("Idle sessions"))
        parts.append(idle)
    return "\n".join(parts).strip("\n")


# -- targets -----------------------------------------------------------------------------


def _span(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{min(values):.2f}" if min(values) == max(values) else f"{min(values):.2f}-{max(values):.2f}"


def _overall(verdicts):
    verdicts = [v for v in verdicts if v != "-"]
    if not verdicts:
        return "-"
    if "errors" in verdicts:
        return "disturbed (errors)"
    return "met" if all(v == "met" for v in verdicts) else "NOT met"


def targetLines(rows, extra):
    """
    One line per target of issue 15, from the comparison cells.
    """
    lines = []
    cells = pop3Cells(rows)
    for scenario, target in CPU_TARGETS.items():
        for transport in TRANSPORTS:
            mine = [c for c in cells if c["scenario"] == scenario and c["transport"] == transport]
            if not mine or all(c["ratio"] is None for c in mine):
                continue
            lines.append(
                f"{scenario} ({transport}) CPU/session mailgate/sqlite / Dovecot hp <= {target}: "
                f"{_span(c['ratio'] for c in mine)}x -> {_overall(c['verdict'] for c in mine)}"
            )
    for c in throughputCells(rows):
        lines.append(
            f"fetchall ({c['transport']}) MB/s at {c['concurrency']} clients mailgate/sqlite / Dovecot hp >= "
            f"{THROUGHPUT_TARGET}: {fmt(c['mailgate'], 1)} vs {fmt(c['dovecot'], 1)} = {fmt(c['ratio'])}x -> {c['verdict']}"
        )
    for c in intakeCells(rows):
        lines.append(
            f"intake mailgate/{c['backend']} {c['protocol']} >= {INTAKE_TARGET}x Dovecot {c['dovecotProtocol']} msgs/s: "
            f"{fmt(c['rate'], 0)} vs {fmt(c['dovecotRate'], 0)} = {fmt(c['ratio'])}x -> {c['verdict']}"
        )
    pg = [(c["pgRatio"], f"{c['scenario']}/{c['transport']}/x{c['concurrency']}", c["pgVerdict"]) for c in cells if c["pgRatio"] is not None]
    pg += [(c["pgRatio"], f"intake {c['protocol']}", c["pgVerdict"]) for c in intakeCells(rows) if c["pgRatio"] is not None]
    if pg:
        worst = max(pg)
        lines.append(
            f"PostgreSQL within {POSTGRES_TARGET}x SQLite (mailgate CPU per session/message), every row: "
            f"worst {worst[0]:.2f}x ({worst[1]}) -> {_overall(v for _, _, v in pg)}"
        )
    for backend in ("sqlite", "postgres"):
        r = find(rows, server="mailgate", backend=backend, credentials="warm", kind="pop3", scenario="retr1",
                 transport="plain", concurrency=1)
        if r and r.get("p99ms") is not None:
            lines.append(
                f"one-message RETR session p99 < {RETR1_P99_MS:g} ms at one client, mailgate/{backend}: "
                f"{r['p99ms']:.2f} ms -> {verdict(r['p99ms'], RETR1_P99_MS, errors=r.get('errors'))}"
            )
    for c in bigCells(extra):
        if c["server"].startswith("mailgate"):
            ok = c["loginToStatMs"] < BIG_LOGIN_MS and c["ok"]
            lines.append(
                f"{c['messages']}-message maildrop login->STAT < {BIG_LOGIN_MS:g} ms, {c['server']}: "
                f"{c['loginToStatMs']:.1f} ms (Dovecot {fmt(next((d['loginToStatMs'] for d in bigCells(extra) if d['server'].startswith('dovecot')), None), 1)} ms) "
                f"-> {'met' if ok else 'NOT met'}"
            )
    for key, how in (("idle sessions", ""), ("idle sessions tls", " over TLS")):
        idle = extra.get(key)
        if not idle or idle.get("rssLoggedInMiB") is None:
            continue
        p99 = idle.get("probeWithIdle", {}).get("p99ms")
        ok = idle["rssLoggedInMiB"] < 1024 and p99 is not None and p99 < 50 and idle.get("loggedIn") == idle["sessions"]
        lines.append(
            f"{idle['sessions']} idle sessions{how} < 1 GiB RSS and an active session's p99 < 50 ms: "
            f"{idle['rssLoggedInMiB']:.0f} MiB, p99 {p99} ms -> {'met' if ok else 'NOT met'}"
        )
    cold = coldCells(rows)
    if cold:
        parts = ", ".join(f"x{c['concurrency']} {fmt(c['ratio'])}x" for c in cold)
        lines.append(f"cold logins (informative): stat CPU/session mailgate / Dovecot {parts}")
    return lines


def steal(info, args=None):
    """
    What the hypervisor took during the run, as a clause of the header
    (nothing where not recorded): CPU time measured in a VM whose host is
    busy is longer for every server, so a run with much of it says so;
    and how many measurements were taken again for it (--steal-limit).
    """
    args = args or {}
    seconds, run = info.get("stealCoreSeconds"), info.get("runSeconds")
    if seconds is None or not run:
        return ""
    share = seconds / (run * (info.get("nproc") or 1))
    text = f"; VM steal during the run: {seconds} core-seconds, {share:.1%} of the machine's time"
    limit = args.get("steal_limit")
    if limit and info.get("stealRepeats") is not None:
        text += (
            f"; a measurement with more than {limit:g} cores of steal was taken again (at most "
            f"{args.get('steal_retries')} times): {info['stealRepeats']} taken again"
        )
    return text


def executableText(info):
    """
    The serving interpreter's binary, where the run knows it.
    """
    return f" ({info['executable']})" if info.get("executable") else ""


def header(info, args, summary):
    """
    The lines above the tables: machine, software, corpus, load average
    before the run and the idle check, what warm means.
    """
    load = info.get("loadavgBefore") or ["-"] * 3
    quiet = (
        f"before each measurement: sync, then wait up to {args['quiet_wait']} s for at most "
        f"{args['quiet_threshold']} cores busy ('bg cores' = the rest of the machine during it)"
        if args.get("quiet_wait") else "no idle wait before measurements (--quiet-wait 0)"
    )
    return "\n".join([
        f"mailgate benchmarks, {info.get('started', '')}; {info.get('nproc')} x {info.get('cpu')}, "
        f"Linux {info.get('kernel')}, {info.get('implementation') or 'Python'} {info.get('python')}{executableText(info)}, Twisted {info.get('twisted')}, "
        f"Dovecot {info.get('dovecot') or '-'}, PostgreSQL {info.get('postgresql', '-')}, git {info.get('git') or '-'}",
        f"load average before the run: {' '.join(load)} (1/5/15 min); {quiet}{steal(info, args)}",
        f"corpus: {summary}; {args['duration']} s per measurement, {args['rounds']} interleaved rounds "
        f"(every measurement on each server in turn; medians); CPU = server process tree (utime+stime, /proc); "
        f"'+DB' = PostgreSQL's processes; conc (n) = at most n sessions at once",
        f"{WARM}; {DOVECOT_HP}",
    ] + ([
        "TLS: both servers with the same self-signed RSA 2048 certificate"
        + (" and an ECDSA P-256 one beside it (mailgate --tls-alt-cert, Dovecot ssl_alt_cert), "
           "which the load generator (TLS 1.3) is given" if args.get("tls_certificates") == "rsa+ecdsa" else "")
        + "; TLS 1.3, X25519, a full handshake per session on both"
    ] if "tls" in str(args.get("transports", "")) else []) + ([
        f"CPUs: every mailgate with --cpu-affinity {args['mailgate_cpus']} (its reactor and database threads); "
        f"Dovecot hp run twice, as it is and with all its processes on CPU {args['mailgate_cpus']}, each cell "
        f"against the better of the two ('(p)': the pinned one)"
    ] if args.get("mailgate_cpus") else []))
