#!/bin/sh
# GitHub Actions runner hook: ACTIONS_RUNNER_HOOK_JOB_COMPLETED=/usr/share/runner-monitor/hooks/github/job-completed.sh
# Ends the job for runner-monitor: from now on, whatever of it still runs is a survivor.
set -u
runner-monitor job end --id "${GITHUB_RUN_ID:-?}/${GITHUB_JOB:-?}" >/dev/null || {
    echo "runner-monitor hook: the monitor was not told that this job ended" >&2
    [ "${RUNNER_MONITOR_REQUIRED:-0}" = 1 ] && exit 1
}
exit 0
