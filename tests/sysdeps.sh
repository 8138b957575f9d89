#!/bin/sh
# Install the Debian packages whose real programs the suite runs: PostgreSQL
# (the shared store) and PgBouncer (tests/test_pgpooler.py), Dovecot with its LMTP (migration and compatibility
# tests: mail reaches its maildirs the way an MTA delivers it), Postfix
# (the LMTP pairing), HAProxy (the PROXY-protocol pairing), Prometheus's
# promtool (the metrics format), logrotate (README's rule), systemd's
# journald and journalctl (tests/test_log_priorities.py: a private journald
# records mailgate's lines at their priorities), and the POP3
# clients users run: fetchmail,
# mpop, getmail6, curl, neomutt and s-nail (tests/test_clients.py).  Idempotent: packages
# already present are not asked for again, and nothing is done when all are
# there.  Only their binaries are used: the tests start private instances on
# loopback and never talk to the system services the packages may install.
set -eu
PACKAGES="postgresql pgbouncer dovecot-pop3d dovecot-lmtpd postfix haproxy prometheus logrotate systemd fetchmail mpop getmail6 curl neomutt s-nail"
missing=""
for p in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "sysdeps: missing Debian packages:$missing (run as root, or install them)" >&2
    exit 0
fi
echo "sysdeps: installing$missing" >&2
# Postfix asks which kind of mail system to configure unless told.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
export DEBIAN_FRONTEND=noninteractive
# The packages' maintainer scripts must not start system services here.
policy=/usr/sbin/policy-rc.d
created=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    created=yes
fi
status=0
{ apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $missing >/dev/null; } || status=$?
[ -n "$created" ] && rm -f "$policy"
exit $status
