#!/bin/sh
# GitHub Actions runner hook: ACTIONS_RUNNER_HOOK_JOB_STARTED=/usr/share/runner-monitor/hooks/github/job-started.sh
# Names the job that this runner's Runner.Worker runs, for runner-monitor. The kernel already
# attributes every process of the job; this adds the repository, workflow and run.
# Set RUNNER_MONITOR_REQUIRED=1 to fail the job when the monitor cannot be told.
set -u
pid=$$
while [ "$pid" -gt 1 ]; do
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "Runner.Worker" ] && break
    pid=$(awk '/^PPid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 1)
done
if [ "$pid" -le 1 ]; then
    echo "runner-monitor hook: no Runner.Worker above process $$" >&2
    [ "${RUNNER_MONITOR_REQUIRED:-0}" = 1 ] && exit 1
    exit 0
fi
runner-monitor job start --platform github \
    --id "${GITHUB_RUN_ID:-?}/${GITHUB_JOB:-?}" --pid "$pid" \
    --repository "${GITHUB_REPOSITORY:-}" --workflow "${GITHUB_WORKFLOW:-}" \
    --run "${GITHUB_RUN_ID:-}" --runner "${RUNNER_NAME:-}" >/dev/null || {
    echo "runner-monitor hook: the monitor was not told about this job" >&2
    [ "${RUNNER_MONITOR_REQUIRED:-0}" = 1 ] && exit 1
}
exit 0
