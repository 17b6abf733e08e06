# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_imgdeploy_global_optspecs
    string join \n c/config= v/verbose q/quiet h/help V/version
end

function __fish_imgdeploy_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_imgdeploy_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_imgdeploy_using_subcommand
    set -l cmd (__fish_imgdeploy_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c imgdeploy -n "__fish_imgdeploy_needs_command" -s c -l config -d 'Config file' -r -F
complete -c imgdeploy -n "__fish_imgdeploy_needs_command" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgdeploy -n "__fish_imgdeploy_needs_command" -s q -l quiet -d 'Only errors on stderr'
complete -c imgdeploy -n "__fish_imgdeploy_needs_command" -s h -l help -d 'Print help'
complete -c imgdeploy -n "__fish_imgdeploy_needs_command" -s V -l version -d 'Print version'
complete -c imgdeploy -n "__fish_imgdeploy_needs_command" -f -a "apply" -d 'Fetch, verify, mount and switch to the published image (idempotent)'
complete -c imgdeploy -n "__fish_imgdeploy_needs_command" -f -a "repair" -d 'Re-hash the active image and, if it is damaged (or dm-verity has failed a read of it), rebuild it in the other slot from the good local chunks plus the damaged ones from the origin, then switch to it. Otherwise the same as `apply` (a newer published serial is installed)'
complete -c imgdeploy -n "__fish_imgdeploy_needs_command" -f -a "status" -d 'Show both slots, which is active, where `link` points, the last apply'
complete -c imgdeploy -n "__fish_imgdeploy_needs_command" -f -a "verify" -d 'Re-hash both slot images against their signed manifests'
complete -c imgdeploy -n "__fish_imgdeploy_needs_command" -f -a "rollback" -d 'Switch back to the standby slot\'s image'
complete -c imgdeploy -n "__fish_imgdeploy_needs_command" -f -a "mount" -d 'At boot: mount the active slot and restore `link` (idempotent)'
complete -c imgdeploy -n "__fish_imgdeploy_needs_command" -f -a "drain" -d 'Wait for processes to leave the standby slot\'s mount, then unmount it (or detach it, as `on_drain_timeout` says, when they stay)'
complete -c imgdeploy -n "__fish_imgdeploy_needs_command" -f -a "boot" -d 'Netboot: run as PID 1 of an `imgbuild netboot` initramfs (also chosen when the binary is started as `/init`). Never run it on a live system'
complete -c imgdeploy -n "__fish_imgdeploy_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand apply" -l source -d 'Use this manifest URL or path instead of the configured `source`' -r
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand apply" -s c -l config -d 'Config file' -r -F
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand apply" -l dry-run -d 'Only report what an update would download (bytes, requests); change nothing'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand apply" -l json -d 'Print the outcome as JSON'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand apply" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand apply" -s q -l quiet -d 'Only errors on stderr'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand apply" -s h -l help -d 'Print help'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand repair" -l source -d 'Use this manifest URL or path instead of the configured `source`' -r
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand repair" -s c -l config -d 'Config file' -r -F
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand repair" -l json -d 'Print the outcome as JSON'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand repair" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand repair" -s q -l quiet -d 'Only errors on stderr'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand repair" -s h -l help -d 'Print help'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand status" -s c -l config -d 'Config file' -r -F
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand status" -l json -d 'Print the status as JSON (stable schema, see README)'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand status" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand status" -s q -l quiet -d 'Only errors on stderr'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand status" -s h -l help -d 'Print help'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand verify" -s c -l config -d 'Config file' -r -F
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand verify" -l json -d 'Print the result as JSON'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand verify" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand verify" -s q -l quiet -d 'Only errors on stderr'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand verify" -s h -l help -d 'Print help'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand rollback" -s c -l config -d 'Config file' -r -F
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand rollback" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand rollback" -s q -l quiet -d 'Only errors on stderr'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand rollback" -s h -l help -d 'Print help'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand mount" -s c -l config -d 'Config file' -r -F
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand mount" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand mount" -s q -l quiet -d 'Only errors on stderr'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand mount" -s h -l help -d 'Print help'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand drain" -l timeout -d 'How long to wait (default: drain_timeout from the config)' -r
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand drain" -s c -l config -d 'Config file' -r -F
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand drain" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand drain" -s q -l quiet -d 'Only errors on stderr'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand drain" -s h -l help -d 'Print help'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand boot" -s c -l config -d 'Config file' -r -F
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand boot" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand boot" -s q -l quiet -d 'Only errors on stderr'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand boot" -s h -l help -d 'Print help'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand help; and not __fish_seen_subcommand_from apply repair status verify rollback mount drain boot help" -f -a "apply" -d 'Fetch, verify, mount and switch to the published image (idempotent)'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand help; and not __fish_seen_subcommand_from apply repair status verify rollback mount drain boot help" -f -a "repair" -d 'Re-hash the active image and, if it is damaged (or dm-verity has failed a read of it), rebuild it in the other slot from the good local chunks plus the damaged ones from the origin, then switch to it. Otherwise the same as `apply` (a newer published serial is installed)'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand help; and not __fish_seen_subcommand_from apply repair status verify rollback mount drain boot help" -f -a "status" -d 'Show both slots, which is active, where `link` points, the last apply'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand help; and not __fish_seen_subcommand_from apply repair status verify rollback mount drain boot help" -f -a "verify" -d 'Re-hash both slot images against their signed manifests'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand help; and not __fish_seen_subcommand_from apply repair status verify rollback mount drain boot help" -f -a "rollback" -d 'Switch back to the standby slot\'s image'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand help; and not __fish_seen_subcommand_from apply repair status verify rollback mount drain boot help" -f -a "mount" -d 'At boot: mount the active slot and restore `link` (idempotent)'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand help; and not __fish_seen_subcommand_from apply repair status verify rollback mount drain boot help" -f -a "drain" -d 'Wait for processes to leave the standby slot\'s mount, then unmount it (or detach it, as `on_drain_timeout` says, when they stay)'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand help; and not __fish_seen_subcommand_from apply repair status verify rollback mount drain boot help" -f -a "boot" -d 'Netboot: run as PID 1 of an `imgbuild netboot` initramfs (also chosen when the binary is started as `/init`). Never run it on a live system'
complete -c imgdeploy -n "__fish_imgdeploy_using_subcommand help; and not __fish_seen_subcommand_from apply repair status verify rollback mount drain boot help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
