#!/usr/bin/env bash
# Install what the local stack needs and pre-resolve the Kafka broker jars. Idempotent: when
# everything is present it only checks, in about a second.
#
#   deploy/local/install.sh
#
# Debian packages: redis-server, redis-tools, prometheus, prometheus-alertmanager, and, when
# missing, maven and a headless JRE. Their init scripts are kept from starting daemons; the
# stack scripts run the binaries themselves on free loopback ports.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v prometheus >/dev/null || need+=(prometheus)
command -v prometheus-alertmanager >/dev/null || need+=(prometheus-alertmanager)
command -v java >/dev/null || need+=(default-jre-headless)
command -v mvn >/dev/null || need+=(maven)

if ((${#need[@]})); then
    apt_install "${need[@]}" || die "apt-get install ${need[*]} failed"
fi

java_major="$(java -XshowSettings:properties -version 2>&1 |
    sed -n 's/^ *java.specification.version = \([0-9]*\).*/\1/p')"
if [[ -n "$java_major" ]] && ((java_major < 17)); then
    die "Kafka 4 needs Java 17 or newer; found Java $java_major"
fi

libs="$("$DEPLOY_LOCAL_DIR/kafka.sh" libs)"
log "Kafka broker jars: $libs"
log "local stack dependencies are installed"
