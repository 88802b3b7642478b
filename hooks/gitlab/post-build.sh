# GitLab Runner (shell executor), config.toml:  post_build_script = ". /usr/share/runner-monitor/hooks/gitlab/post-build.sh"
runner-monitor job end --id "${CI_JOB_ID:-?}" >/dev/null ||
    echo "runner-monitor hook: the monitor was not told that this job ended" >&2
