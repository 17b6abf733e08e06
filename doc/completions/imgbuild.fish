# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_imgbuild_global_optspecs
    string join \n v/verbose q/quiet h/help V/version
end

function __fish_imgbuild_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_imgbuild_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_imgbuild_using_subcommand
    set -l cmd (__fish_imgbuild_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c imgbuild -n "__fish_imgbuild_needs_command" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -s q -l quiet -d 'Only errors on stderr'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -s V -l version -d 'Print version'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "keygen" -d 'Create an Ed25519 key pair: PREFIX.key (PKCS#8 PEM, 0600) and PREFIX.pub'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "build" -d 'Pack SRC into an image and publish it to a channel in the repository'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "verify" -d 'Check a published manifest: signature, expiry, image size and sha256'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "inspect" -d 'Show what a manifest or an image file says (does not check signatures)'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "netboot" -d 'Build PXE/iPXE artifacts that boot a machine from the image in RAM'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "rollout" -d 'Re-sign a channel\'s manifest with a staged-rollout percentage (same image, new serial; 0 pauses)'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "refresh" -d 'Re-sign a channel\'s current manifest with a new expiry (same image, same rollout, next serial); run it from a CI schedule'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "promote" -d 'Sign a manifest for channel TO serving exactly the image channel FROM serves'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "gc" -d 'Remove images, chunk indexes and sigs/ signatures no channel references, keeping the newest N of each'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand keygen" -l out -d 'Path prefix of the two files' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand keygen" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand keygen" -s q -l quiet -d 'Only errors on stderr'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand keygen" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l key -d 'Private signing key (PKCS#8 PEM)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l trust -d 'Also accept the repository\'s current manifest when signed by this public key: the first publish after a key rotation (repeatable)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l channel -d 'Channel to publish to (a-z, 0-9, \'.\', \'_\', \'-\')' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l repo -d 'Repository directory (created if missing)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l version -d 'Human version label (default: r<serial>)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l serial -d 'Serial number (default: the channel\'s current serial + 1; must increase)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l level -d 'zstd compression level' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l exclude -d 'Leave out paths matching this glob, relative to SRC (repeatable; `*` stays within a component, `**` crosses)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l expires-in -d 'How long the manifest stays valid (e.g. 7d, 12h). Shorter limits how long a mirror can hold hosts on an old manifest; `imgbuild refresh` on a CI schedule keeps it from running out' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l jobs -d 'Compression threads (default: all cores)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l deltas -d 'Make static deltas to the new image from the channel\'s last K images (0: none). Deployers older than static deltas refuse a manifest that lists any: build with 0 until the fleet is upgraded' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l rollout -d 'Publish as a staged rollout to this share of hosts (0-100; default: all)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l no-fragments -d 'Store each file\'s tail in its own block instead of shared fragment blocks'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l align -d 'Start each file\'s data at a 4 KiB boundary of the image, so that deployers whose state directory is on XFS or btrfs share the extents of unchanged files with the old image instead of copying them (the image grows by about 2 KiB per file of 128 KiB or more)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l no-reuse -d 'Compress every block, instead of copying the compressed bytes of blocks the repository\'s current images already hold (the image is the same either way)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l json -d 'Print the result as one JSON object'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -s q -l quiet -d 'Only errors on stderr'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand verify" -l pub -d 'Trusted public key (repeat for several)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand verify" -l http-headers-file -d 'File of `Name: value` HTTP headers sent with every request (e.g. a bearer token); mode 0600' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand verify" -l tls-ca-bundle -d 'PEM CA certificates that replace the built-in roots for the origin' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand verify" -l tls-client-cert -d 'PEM client certificate chain presented to the origin (with --tls-client-key)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand verify" -l tls-client-key -d 'PEM private key of --tls-client-cert; mode 0600' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand verify" -l json -d 'Print the result as JSON'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand verify" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand verify" -s q -l quiet -d 'Only errors on stderr'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand verify" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand inspect" -l blocks -d 'Also summarise the image\'s block map (needs a manifest, beside its map)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand inspect" -l json -d 'Print the result as JSON'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand inspect" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand inspect" -s q -l quiet -d 'Only errors on stderr'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand inspect" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l manifest -d 'The channel manifest (path or http(s) URL); verified before use. Its channel and serial are bound into the initrd. Default with --channel-url: the first channel URL' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l channel-url -d 'Network mode: /init fetches the channel\'s current manifest and image from this URL at boot (repeat for mirrors, tried in order; imgdeploy.url= on the kernel command line replaces them). No image.cpio is written' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l busybox -d 'Network mode: a statically linked busybox for udhcpc and ip (default /bin/busybox, from busybox-static)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l net-modules -d 'Network mode: more network driver modules to include, beyond virtio_net, e1000, e1000e, igb, ixgbe and mlx5_core (repeatable or comma-separated)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l pub -d 'Trusted public key, checked now and embedded for boot-time checks (repeatable)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l kernel -d 'Kernel image to boot (e.g. /boot/vmlinuz-6.1.0-28-amd64)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l modules -d 'That kernel\'s module directory (e.g. /lib/modules/6.1.0-28-amd64)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l out -d 'Output directory' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l init -d 'A statically linked imgdeploy to run as /init (default: /usr/lib/imgdeploy/netboot-init from the imgbuild package; scripts/build-netboot-init.sh builds one)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l shell -d 'A static shell to include as /bin/sh for imgdeploy.onfail=shell (e.g. /bin/busybox)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l cmdline -d 'Extra kernel command line written into boot.ipxe' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l http-headers-file -d 'File of `Name: value` HTTP headers sent with every request (e.g. a bearer token); mode 0600' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l tls-ca-bundle -d 'PEM CA certificates that replace the built-in roots for the origin' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l tls-client-cert -d 'PEM client certificate chain presented to the origin (with --tls-client-key)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l tls-client-key -d 'PEM private key of --tls-client-cert; mode 0600' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -l json -d 'Print the summary as JSON'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -s q -l quiet -d 'Only errors on stderr'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand netboot" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand rollout" -l repo -d 'Repository directory' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand rollout" -l channel -d 'The channel' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand rollout" -l percent -d 'Share of hosts that should take the image (0-100)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand rollout" -l key -d 'Private signing key' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand rollout" -l trust -d 'Also accept the repository\'s current manifests when signed by this public key: the first publish after a key rotation (repeatable)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand rollout" -l expires-in -d 'How long the new manifest stays valid' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand rollout" -l json -d 'Print the new manifest as JSON'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand rollout" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand rollout" -s q -l quiet -d 'Only errors on stderr'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand rollout" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand refresh" -l repo -d 'Repository directory' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand refresh" -l channel -d 'The channel' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand refresh" -l key -d 'Private signing key' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand refresh" -l trust -d 'Also accept the repository\'s current manifests when signed by this public key: the first publish after a key rotation (repeatable)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand refresh" -l expires-in -d 'How long the new manifest stays valid' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand refresh" -l json -d 'Print the new manifest as JSON'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand refresh" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand refresh" -s q -l quiet -d 'Only errors on stderr'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand refresh" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand promote" -l repo -d 'Repository directory' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand promote" -l from -d 'Source channel (e.g. beta)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand promote" -l to -d 'Target channel (e.g. stable)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand promote" -l percent -d 'Start the target channel as a staged rollout (0-100)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand promote" -l key -d 'Private signing key' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand promote" -l trust -d 'Also accept the repository\'s current manifests when signed by this public key: the first publish after a key rotation (repeatable)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand promote" -l expires-in -d 'How long the new manifest stays valid' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand promote" -l json -d 'Print the new manifest as JSON'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand promote" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand promote" -s q -l quiet -d 'Only errors on stderr'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand promote" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand gc" -l repo -d 'Repository directory' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand gc" -l keep -d 'Unreferenced images to keep (newest first)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand gc" -l dry-run -d 'Only say what would be removed'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand gc" -l json -d 'Print the result as JSON'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand gc" -s v -l verbose -d 'More log output (repeat for more)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand gc" -s q -l quiet -d 'Only errors on stderr'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand gc" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from keygen build verify inspect netboot rollout refresh promote gc help" -f -a "keygen" -d 'Create an Ed25519 key pair: PREFIX.key (PKCS#8 PEM, 0600) and PREFIX.pub'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from keygen build verify inspect netboot rollout refresh promote gc help" -f -a "build" -d 'Pack SRC into an image and publish it to a channel in the repository'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from keygen build verify inspect netboot rollout refresh promote gc help" -f -a "verify" -d 'Check a published manifest: signature, expiry, image size and sha256'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from keygen build verify inspect netboot rollout refresh promote gc help" -f -a "inspect" -d 'Show what a manifest or an image file says (does not check signatures)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from keygen build verify inspect netboot rollout refresh promote gc help" -f -a "netboot" -d 'Build PXE/iPXE artifacts that boot a machine from the image in RAM'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from keygen build verify inspect netboot rollout refresh promote gc help" -f -a "rollout" -d 'Re-sign a channel\'s manifest with a staged-rollout percentage (same image, new serial; 0 pauses)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from keygen build verify inspect netboot rollout refresh promote gc help" -f -a "refresh" -d 'Re-sign a channel\'s current manifest with a new expiry (same image, same rollout, next serial); run it from a CI schedule'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from keygen build verify inspect netboot rollout refresh promote gc help" -f -a "promote" -d 'Sign a manifest for channel TO serving exactly the image channel FROM serves'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from keygen build verify inspect netboot rollout refresh promote gc help" -f -a "gc" -d 'Remove images, chunk indexes and sigs/ signatures no channel references, keeping the newest N of each'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from keygen build verify inspect netboot rollout refresh promote gc help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
