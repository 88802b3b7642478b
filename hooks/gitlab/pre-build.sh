# GitLab Runner (shell executor), config.toml:  pre_build_script = ". /usr/share/runner-monitor/hooks/gitlab/pre-build.sh"
# Sourced by the job's shell: that shell ($$) becomes the job's root, with all it starts.
runner-monitor job start --platform gitlab \
    --id "${CI_JOB_ID:-?}" --pid "$$" \
    --repository "${CI_PROJECT_PATH:-}" --workflow "${CI_JOB_NAME:-}" \
    --run "${CI_PIPELINE_ID:-}" --runner "${CI_RUNNER_ID:-}" >/dev/null ||
    echo "runner-monitor hook: the monitor was not told about this job" >&2
