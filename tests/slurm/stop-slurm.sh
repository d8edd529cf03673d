#!/usr/bin/env bash
# Stop the daemons start-slurm.sh started, by their pid files, and wait until they are gone.
for f in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
  [ -s "$f" ] || continue
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || continue
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
done
exit 0
