# lab-needs: cloud-hypervisor
# lab-needs: cloud-hypervisor-patched
# Scenario ch-vs-stock-on: ch-vs-stock-off (its header says what is measured) with
# --memory shared=on: stock writes the memfd's data extents, the patched binary an ext-snapshot.
# shellcheck source=ci/scenarios/lib.sh
. /opt/ext/scenarios/lib.sh
# shellcheck source=ci/scenarios/ch-vs-stock-lib.sh
. /opt/ext/scenarios/ch-vs-stock-lib.sh

compare_shared on
pass
