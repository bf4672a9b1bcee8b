#!/usr/bin/env bash
# Brings up a one-node Slurm test cluster on this machine (localhost); idempotent.
# - installs Debian's `slurm-wlm` and `munge` if missing (nothing else is downloaded);
# - creates a munge key if missing and starts munged if it is not running;
# - writes /etc/slurm/slurm.conf (ClusterName=ieu, one node = this host, partition
#   `debug`, no cgroups, no accounting) only when it differs from what is here;
# - starts slurmctld and slurmd directly (no systemd needed), waits for the node to be idle;
# - runs `echo ok` through sbatch to prove that the cluster works.
# `.ci/run` calls it for tests/slurm.rs (which also calls it). A second run only checks.
# Exits non-zero with a message (and the daemons' log tails) if anything fails.
set -Eeuo pipefail

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then exec sudo -E bash "$0" "$@"; fi
  echo "slurm-local.sh: FAILED: must run as root (and sudo is not available)" >&2
  exit 1
fi

CONF_DIR=/etc/slurm
RUN_DIR=/var/run/slurm
LOG_DIR=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
WAIT_S=${SLURM_LOCAL_WAIT_S:-30}

log() { echo "== $*"; }
die() {
  echo "slurm-local.sh: FAILED: $*" >&2
  for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
    if [ -s "$f" ]; then echo "--- last lines of $f" >&2; tail -n 15 "$f" >&2; fi
  done
  echo "slurm-local.sh: the tests that need a Slurm cluster cannot run" >&2
  exit 1
}
trap 'die "command failed at line $LINENO: $BASH_COMMAND"' ERR
running() { pgrep -x "$1" >/dev/null 2>&1; }

# 1. Packages -----------------------------------------------------------------------
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
if installed slurm-wlm && installed munge; then
  log "slurm-wlm and munge are installed"
else
  command -v apt-get >/dev/null 2>&1 || die "slurm-wlm/munge are missing and there is no apt-get"
  log "installing slurm-wlm and munge from Debian"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null \
    || die "apt-get install slurm-wlm munge failed"
fi
for c in munged munge unmunge slurmctld slurmd sinfo scontrol sbatch squeue; do
  command -v "$c" >/dev/null 2>&1 || die "$c is not on PATH after installing slurm-wlm/munge"
done

# 2. Munge --------------------------------------------------------------------------
id munge >/dev/null 2>&1 || die "the munge package did not create the user munge"
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
KEY=/etc/munge/munge.key
if [ ! -s "$KEY" ]; then
  log "creating $KEY"
  if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile="$KEY"
  elif [ -x /usr/sbin/create-munge-key ]; then
    /usr/sbin/create-munge-key -f
  else
    dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none
  fi
fi
chown munge:munge "$KEY"
chmod 0400 "$KEY"
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if munge_ok; then
  log "munged is running"
else
  if running munged; then die "munged is running but munge -n | unmunge fails"; fi
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged || die "munged did not start"
  for _ in $(seq 1 20); do munge_ok && break; sleep 0.5; done
  munge_ok || die "munged started but munge -n | unmunge fails"
fi

# 3. Configuration ------------------------------------------------------------------
HOST=$(hostname -s)
[ -n "$HOST" ] || die "hostname -s is empty"
CPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
REAL_MB=$((MEM_MB * 95 / 100)) # a bit below MemTotal, so that slurmd does not drain the node
DEF_MEM=$((REAL_MB / CPUS))    # so that a job without --mem does not take the whole node
install -d -m 0755 "$CONF_DIR" "$RUN_DIR" "$LOG_DIR" "$SLURMD_SPOOL"
install -d -m 0700 "$CTLD_SPOOL"

write_if_changed() { # file content: 0 if rewritten, 1 if unchanged
  local tmp
  tmp=$(mktemp)
  printf '%s\n' "$2" >"$tmp"
  if [ -f "$1" ] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
  install -m 0644 "$tmp" "$1"
  rm -f "$tmp"
  log "wrote $1"
}
SLURM_CONF="# Written by ieu-bench scripts/slurm-local.sh: a one-node test cluster on localhost.
ClusterName=ieu
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=30
MinJobAge=300
SlurmctldTimeout=120
SlurmdTimeout=300
Waittime=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP"
# Slurm 22.05 has no CgroupPlugin=disabled and slurmd loads a cgroup plugin even with
# proctrack/linuxproc and task/none; nothing constrains jobs with cgroups here, and without
# systemd (or its D-Bus) cgroup/v2 has to set up its hierarchy itself.
CGROUP_CONF="# Written by ieu-bench scripts/slurm-local.sh: cgroups are not used by this test cluster.
CgroupPlugin=autodetect
IgnoreSystemdOnFailure=yes"
changed=0
if write_if_changed "$CONF_DIR/slurm.conf" "$SLURM_CONF"; then changed=1; fi
if write_if_changed "$CONF_DIR/cgroup.conf" "$CGROUP_CONF"; then changed=1; fi

# 4. Daemons ------------------------------------------------------------------------
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
wait_for() { # seconds command...: polls the command every half second, 1 on time-out
  local n=$(($1 * 2))
  shift
  for _ in $(seq 1 "$n"); do "$@" && return 0; sleep 0.5; done
  return 1
}
if [ "$changed" = 1 ] && { running slurmctld || running slurmd; }; then
  log "configuration changed: restarting the Slurm daemons"
  scontrol shutdown >/dev/null 2>&1 || true
  gone() { ! running slurmctld && ! running slurmd; }
  wait_for 20 gone || die "slurmctld/slurmd still run 20 s after scontrol shutdown"
fi
if running slurmctld; then
  log "slurmctld is running"
else
  log "starting slurmctld"
  slurmctld || die "slurmctld did not start"
fi
wait_for "$WAIT_S" ctld_up || die "slurmctld does not answer scontrol ping after $WAIT_S s"
if running slurmd; then
  log "slurmd is running"
else
  log "starting slurmd"
  slurmd || die "slurmd did not start"
fi

node_state() { sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n 1; }
node_ready() {
  local s
  s=$(node_state)
  case "$s" in
    idle | mixed | allocated | completing) return 0 ;;
    *'*') ;; # not responding (yet): slurmd has to register first
    down* | drain* | fail*)
      scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
  esac
  return 1
}
wait_for "$WAIT_S" node_ready \
  || die "node $HOST is not idle after $WAIT_S s (sinfo: $(sinfo -h -N -n "$HOST" -o '%T %E' 2>&1 | head -n 1))"

# 5. A trivial job ------------------------------------------------------------------
JOB_DIR=$(mktemp -d)
trap 'rm -rf "$JOB_DIR"' EXIT
JOB=$(sbatch --parsable --job-name=slurm-local-check --chdir="$JOB_DIR" \
  --output="$JOB_DIR/slurm-%j.out" --time=1 --wrap 'echo ok') || die "sbatch failed"
JOB=${JOB%%;*}
job_gone() { [ -z "$(squeue -h -j "$JOB" -o %i 2>/dev/null)" ]; }
wait_for 60 job_gone || die "job $JOB is still in squeue after 60 s: $(squeue -h -j "$JOB" -o '%T %r' 2>&1)"
OUT_FILE="$JOB_DIR/slurm-$JOB.out"
[ -f "$OUT_FILE" ] || die "job $JOB wrote no $OUT_FILE ($(scontrol show job "$JOB" 2>&1 | grep -o 'JobState=[^ ]*' || true))"
[ "$(cat "$OUT_FILE")" = ok ] || die "job $JOB printed '$(cat "$OUT_FILE")', not ok"
log "test job $JOB printed ok"

log "slurm ready: $(sinfo -h -o '%R %a %l %D %T %N' | head -n 1) ($(sinfo -V))"
