#!/usr/bin/env bash
# Breaks the product on purpose, one mutation at a time, in a scratch clone of
# HEAD, and runs the tests that must catch each. A mutation is "caught" only
# when one of the tests named for it fails (the tests that guard that harm),
# and the mutation really changed the source (the script checks). Prints one
# line per mutation and the total; exits non-zero if any was missed.
#
#   sudo bash scripts/mutations.sh [NAME...]     (all by default; slow: a
#                                                 rebuild and a test run each)
#
# Not part of CI (a rebuild and a test run for each of 28); RELIABILITY.md carries the table.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=${MUTATIONS_DIR:-/tmp/imgdeploy-mutations}
mkdir -p "$work"
rm -rf "$work/src"
git clone -q "$root" "$work/src"
export CARGO_TARGET_DIR=$work/target
unset IMGDEPLOY_NETBOOT_INIT
bash scripts/setup-debian.sh >/dev/null

# mutation NAME HARM FILE PERL-SUBSTITUTION TESTS: TESTS are the cargo test
# names that must catch it (unit:CRATE:FILTER for unit tests).
names=() harms=() files=() substs=() testss=()
mutation() { names+=("$1"); harms+=("$2"); files+=("$3"); substs+=("$4"); testss+=("$5"); }

mutation 'non-atomic-switch' \
  'link is removed, then recreated: readers see it missing' \
  'deployer/src/switch.rs' \
  's/symlink\(target, &tmp\)\.map_err\(err\)\?;\n    if let Err\(e\) = std::fs::rename\(&tmp, link\) \{/let _ = std::fs::remove_file(link);\n    std::thread::sleep(std::time::Duration::from_millis(1));\n    symlink(target, link).map_err(err)?;\n    if let Err(e) = Ok::<(), io::Error>(()) {/' \
  'deployer::privileged_readers_see_no_errors_during_switches'
mutation 'manifest-signature-unchecked' \
  'a manifest is used whatever its signature' \
  'common/src/trust.rs' \
  's/let key = verify_any\(trusted, bytes, signature\)\?;/let key = verify_any(trusted, bytes, signature).unwrap_or(\&trusted[0]);/' \
  'deployer::privileged_each_signature_case_is_refused_before_any_image_byte'
mutation 'index-digest-unchecked' \
  'a chunk index is used without its signed sha256' \
  'deployer/src/delta.rs' \
  's/if sha != r\.sha256 \{/if false \&\& sha != r.sha256 {/' \
  'delta::privileged_truncated_or_tampered_index_is_rejected'
mutation 'delta-chunk-unchecked' \
  'downloaded chunks are written without their hash' \
  'deployer/src/delta.rs' \
  's/if ChunkHash::of\(&buf\) != c\.hash \{/if false {/' \
  'delta::privileged_tampered_chunk_on_server_is_caught'
mutation 'chunk-reuse-unchecked' \
  'local chunks are reused without their hash' \
  'deployer/src/delta.rs' \
  's/read_chunk\(&seeds\[si\]\.file, off, len, &mut buf\)\.is_ok_and\(\|h\| h == c\.hash\)/read_chunk(\&seeds[si].file, off, len, \&mut buf).is_ok()/' \
  'delta::privileged_tampered_chunk_in_local_slot_is_not_reused'
mutation 'reuse-block-unchecked' \
  'an incremental build copies a block of an earlier image without checking its bytes against the signed map' \
  'builder/src/blocks.rs' \
  's/            && Sha256Digest::of_bytes\(&self\.scratch\) == c\.disk_sha256;/;/' \
  'blocks::corrupted_or_missing_earlier_images_are_never_copied_from'
mutation 'reuse-unsigned-map' \
  'an incremental build trusts a block map that is not the one the manifest signs' \
  'builder/src/publish.rs' \
  's/if found != \(r\.size, r\.sha256\) \{/if false {/' \
  'blocks::corrupted_or_missing_earlier_images_are_never_copied_from'
mutation 'reuse-any-compressor' \
  'blocks compressed at another level (or zstd release) are copied, so the image differs from a fresh build' \
  'builder/src/blocks.rs' \
  's/if s\.map\.compressor != compressor \{/if false {/' \
  'blocks::incremental_builds_equal_builds_from_scratch_after_every_kind_of_change'
mutation 'map-raw-hash-wrong' \
  'the block map names the bytes of a block on disk as its content, so reuse and deltas look up the wrong thing' \
  'builder/src/blocks.rs' \
  's/Some\(c\) => c,/Some(c) => (disk_sha256, c.1),/' \
  'blocks::block_maps_name_every_block_and_recompress_to_the_image'
mutation 'verity-tree-unsalted' \
  'the hash tree is computed without the salt the manifest signs: no kernel would accept it' \
  'common/src/verity.rs' \
  's/hash\.copy_from_slice\(&salted\(salt, block\)\);/hash.copy_from_slice(\&salted(\&Sha256Digest([0; 32]), block));/' \
  'verity::veritysetup_verifies_the_tree_and_writes_the_same_bytes'
mutation 'require-verity-ignored' \
  'require_verity = true mounts without dm-verity anyway' \
  'deployer/src/mount.rs' \
  's/Err\(source\) if req\.required =>/Err(source) if false \&\& req.required =>/' \
  'verity::privileged_without_dm_verity_slots_say_install_time_and_require_verity_refuses'
mutation 'repair-sees-no-damage' \
  'a damaged active image is never repaired' \
  'deployer/src/apply.rs' \
  's/if let Some\(why\) = active_damage\(layout, cur, opts\.check_active\)/if let Some(why) = None::<String>/' \
  'verity::privileged_repair_fetches_only_the_damaged_chunks'
mutation 'delta-fetches-the-tree' \
  'every delta downloads the hash tree again (1/128 of the image), though the deployer can compute it' \
  'deployer/src/delta.rs' \
  's/let Some\(v\) = verity else \{ return 0 \};/let Some(v) = verity.filter(|_| false) else { return 0 };/' \
  'delta::privileged_delta_is_byte_identical_and_small'
mutation 'static-delta-unchecked' \
  'a static delta is parsed and applied without its signed sha256' \
  'deployer/src/static_delta.rs' \
  's/if \(found, len\) != \(d\.sha256, d\.size\) \{/if false {/' \
  'static_delta::privileged_bad_static_deltas_fall_back'
mutation 'static-delta-fetches-the-index' \
  'a static delta that reproduced still fetches the chunk index and checks every chunk (200 KB more than the 48 KB delta on the bench)' \
  'deployer/src/apply.rs' \
  's/filter\(\|s\| s\.applied\.unreproduced_bytes == 0\)/filter(|s| s.applied.unreproduced_bytes == u64::MAX)/' \
  'static_delta::privileged_static_deltas_make_every_kind_of_change_byte_identical'
mutation 'download-hash-unchecked' \
  'a downloaded image is mounted without its sha256' \
  'deployer/src/fetch.rs' \
  's/if found != manifest\.image\.sha256 \{/if false {/' \
  'deployer::privileged_bad_inputs_leave_the_active_version_serving'
mutation 'slot-hash-unchecked' \
  'a slot image is mounted (rollback, boot) without its sha256' \
  'deployer/src/slot.rs' \
  's/if n != len \|\| sha != manifest\.image\.sha256 \{/if n != len {/' \
  'deployer::privileged_full_cycle_through_nginx deployer::privileged_boot_falls_back_to_the_other_verified_slot'
mutation 'mount-writable' \
  'slots are mounted read-write' \
  'deployer/src/mount.rs' \
  's/let mut flags = MsFlags::MS_RDONLY;/let mut flags = MsFlags::empty();/' \
  'deployer::privileged_mount_options_and_allow_downgrade'
mutation 'mount-dev-suid' \
  'slots are mounted without nodev,nosuid' \
  'deployer/src/mount.rs' \
  's/\(opts\.nodev, MsFlags::MS_NODEV\),\n        \(opts\.nosuid, MsFlags::MS_NOSUID\),/(false, MsFlags::MS_NODEV),\n        (false, MsFlags::MS_NOSUID),/' \
  'deployer::privileged_mount_options_and_allow_downgrade'
mutation 'no-fsync-atomic-write' \
  'state, manifests and links are renamed in without fsync' \
  'common/src/atomic.rs' \
  's/    tmp\.as_file\(\)\.sync_all\(\)\?;\n//; s/    File::open\(tmp\)\?\.sync_all\(\)\?;\n//' \
  'powerloss::privileged_power_loss_leaves_one_consistent_version'
mutation 'floor-unenforced' \
  'an older, correctly signed manifest is installed (replay)' \
  'deployer/src/decide.rs' \
  's/if m\.serial < serial && !f\.allow_downgrade \{/if false {/' \
  'unit:imgdeploy-deployer:decide trust::privileged_replay_after_a_reused_image_is_refused'
mutation 'channel-unchecked' \
  'another channel'\''s manifest is installed' \
  'deployer/src/fetch.rs' \
  's/if verified\.manifest\.channel != channel \{/if false {/' \
  'deployer::privileged_bad_inputs_leave_the_active_version_serving'
mutation 'expiry-unchecked' \
  'an expired manifest is installed' \
  'common/src/trust.rs' \
  's/if manifest\.expires <= now \{/if false {/' \
  'deployer::privileged_bad_inputs_leave_the_active_version_serving'
mutation 'drain-skipped' \
  'the old version is pulled from its users at once' \
  'deployer/src/drain.rs' \
  's/let dev = device_at\(&target\)\?;\n    let deadline = Instant::now\(\) \+ timeout;\n/let dev = device_at(\&target)?;\n    let _ = nix::mount::umount2(\&target, nix::mount::MntFlags::MNT_DETACH);\n    return Ok(Retired::default());\n    #[allow(unreachable_code)]\n    let deadline = Instant::now() + timeout;\n/' \
  'deployer::privileged_drain_waits_for_holders_and_busy_standby_stops_apply'
mutation 'hook-failure-ignored' \
  'a failing health check or post_switch hook is ignored' \
  'deployer/src/hooks.rs' \
  's/Ok\(Some\(status\)\) if status\.success\(\) => return Ok\(\(\)\),/Ok(Some(_)) => return Ok(()),/' \
  'deployer::privileged_hooks_gate_and_follow_the_switch'
mutation 'netboot-any-key' \
  'boot mode trusts keys an earlier archive added' \
  'deployer/src/boot/mod.rs' \
  's/let keys = trusted_keys\(policy\)\?;/let mut keys = trusted_keys(policy)?;\n    for e in fs::read_dir(\"\/etc\/imgdeploy\/keys\").into_iter().flatten().flatten() { if let Ok(k) = PublicKey::read(\&e.path()) { keys.push(k); } }/' \
  'netboot::privileged_netboot_boots_only_what_the_trusted_initrd_allows'
mutation 'netboot-net-image-unchecked' \
  'network mode boots a downloaded image without its sha256' \
  'deployer/src/boot/download.rs' \
  's/if let Err\(e\) = check_image\(&mut file, &m\) \{/if let Some(e) = check_image(\&mut file, \&m).err().filter(|_| false) {/' \
  'netboot::privileged_netboot_network_mode_boots_the_channels_current_image'
mutation 'netboot-net-any-signature' \
  'network mode boots a manifest whatever its signature' \
  'deployer/src/boot/download.rs' \
  's/let v = verify_signed\(&bytes, &sig, keys\)/let v = verify_signed(\&bytes, \&sig, keys).or_else(|_| Manifest::parse(\&bytes).map(|manifest| imgdeploy_common::trust::VerifiedManifest { manifest, key_id: "unchecked".into() }).map_err(imgdeploy_common::trust::TrustError::from))/' \
  'netboot::privileged_netboot_network_mode_boots_the_channels_current_image'

selected=("$@")
want() {
  [[ ${#selected[@]} -eq 0 ]] && return 0
  local n
  for n in "${selected[@]}"; do [[ $n == "$1" ]] && return 0; done
  return 1
}

ns=()
if [[ $(id -u) -eq 0 ]] && unshare --mount --propagation private true 2>/dev/null; then
  ns=(unshare --mount --propagation private)
fi

caught=0 missed=0
for i in "${!names[@]}"; do
  name=${names[$i]} harm=${harms[$i]} file=${files[$i]} subst=${substs[$i]} tests=${testss[$i]}
  want "$name" || continue
  git -C "$work/src" checkout -q -- .
  before=$(sha256sum "$work/src/$file")
  perl -0pi -e "$subst" "$work/src/$file"
  if [[ $(sha256sum "$work/src/$file") == "$before" ]]; then
    echo "mutation $name did not apply to $file; update scripts/mutations.sh" >&2
    exit 2
  fi
  log=$work/$name.log
  : >"$log"
  (cd "$work/src" && cargo build -q --workspace >>"$log" 2>&1) || {
    echo "mutation $name does not compile; see $log" >&2
    exit 2
  }
  if [[ $name == netboot-* ]]; then
    IMGDEPLOY_NETBOOT_INIT=$(cd "$work/src" && bash scripts/build-netboot-init.sh 2>>"$log")
    export IMGDEPLOY_NETBOOT_INIT
  fi
  failed=()
  for t in $tests; do
    if [[ $t == unit:* ]]; then
      IFS=: read -r _ crate filter <<<"$t"
      cmd=(cargo test -q -p "$crate" --lib -- "$filter")
    else
      cmd=("${ns[@]}" cargo test -q -p imgdeploy-tests --test e2e -- --exact "$t" --test-threads=1)
    fi
    if ! (cd "$work/src" && "${cmd[@]}" >>"$log" 2>&1); then
      failed+=("$t")
    fi
  done
  if [[ ${#failed[@]} -gt 0 ]]; then
    caught=$((caught + 1))
    why=$(grep -A1 -m1 'panicked at' "$log" | tail -n1 | cut -c1-110)
    line="caught  $name: $harm — by ${failed[*]} (${why})"
  else
    missed=$((missed + 1))
    line="MISSED  $name: $harm — $tests all passed"
  fi
  echo "$line"
  unset IMGDEPLOY_NETBOOT_INIT
done
git -C "$work/src" checkout -q -- .
echo "mutations: $((caught + missed)) run, $caught caught, $missed missed"
[[ $missed -eq 0 ]]
