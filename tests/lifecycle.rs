//! End-to-end tests of the repository's lifecycle: retention policies stored in
//! the repository, `ebb forget` applying them.

mod common;

use std::fs;

use common::{assert_trees_equal, build_fidelity_tree, pseudo_random_bytes, Backend, TestRepo};
use serde_json::Value;

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Six points of a changing tree; `keep-last 2` and `keep-within` of the newest:
/// forget --dry-run changes nothing, forget removes exactly the points the policy
/// does not keep, every kept point still restores exactly, `points` lists only the
/// kept ones, and verify tells the forgotten points from lost ones.
#[test]
fn forget_removes_what_the_policy_does_not_keep_and_nothing_else() {
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    build_fidelity_tree(&src);
    let mut states = Vec::new();
    for i in 0..6u64 {
        fs::write(src.join("changing"), pseudo_random_bytes(i, 300_000)).unwrap();
        fs::write(src.join(format!("added-{i}")), format!("point {i}")).unwrap();
        let point = json(&repo.ok(&["backup", "--json", "--source", "s", src.to_str().unwrap()]));
        let time = point["time"].as_str().unwrap().to_string();
        let restored = work.path().join(format!("before-{i}"));
        repo.ok(&["restore", "--at", &time, restored.to_str().unwrap()]);
        assert_trees_equal(&src, &restored);
        states.push((point["name"].as_str().unwrap().to_string(), time, restored));
    }

    // Nothing to forget without a policy.
    let v = json(&repo.ok(&["forget", "--json"]));
    assert_eq!(v["sources"][0]["removed"], 0, "{v}");
    assert!(v["sources"][0]["rules"].is_null(), "{v}");

    repo.ok(&["policy", "set", "--source", "s", "--keep-last", "2", "--time-zone", "UTC"]);
    let shown = json(&repo.ok(&["policy", "show", "--json"]));
    assert_eq!(shown[0]["source"], "s");
    assert_eq!(shown[0]["policy"]["keep_last"], 2);
    assert_eq!(shown[0]["rules"], serde_json::json!(["keep-last 2"]));
    // Setting one rule keeps the others.
    repo.ok(&["policy", "set", "--keep-within", "1s"]);
    let shown = json(&repo.ok(&["policy", "show", "--source", "s", "--json"]));
    assert_eq!(shown[0]["rules"], serde_json::json!(["keep-last 2", "keep-within 1s"]), "{shown}");
    assert_eq!(shown[0]["policy"]["time_zone"], "UTC");

    let before = repo.objects();
    let dry = json(&repo.ok(&["forget", "--dry-run", "--json"]));
    assert_eq!(repo.objects(), before, "a dry run changes nothing");
    let verdicts = &dry["sources"][0]["points"];
    let kept: Vec<&str> = verdicts
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["keep"] == true)
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    // Oldest first: the two newest are kept by keep-last; keep-within 1s of the
    // newest may keep more, if the backups came less than a second apart.
    let newest = &verdicts[5];
    assert_eq!(newest["reasons"][0], "newest", "{dry}");
    assert!(newest["reasons"].as_array().unwrap().contains(&"last".into()));
    assert!(verdicts[4]["reasons"].as_array().unwrap().contains(&"last".into()));
    assert!(kept.len() >= 2 && kept.len() < 6, "{dry}");
    for p in verdicts.as_array().unwrap() {
        assert_eq!(p["keep"] == true, !p["reasons"].as_array().unwrap().is_empty(), "{p}");
    }

    let done = json(&repo.ok(&["forget", "--json"]));
    assert_eq!(done["sources"][0]["removed"], 6 - kept.len(), "{done}");
    let listed = json(&repo.ok(&["points", "--json"]));
    let listed: Vec<&str> = listed.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(listed, kept, "points lists exactly the kept points");

    // Every kept point restores as it did before the forget.
    for (name, time, before) in &states {
        if !kept.contains(&name.as_str()) {
            continue;
        }
        let target = work.path().join(format!("after-{time}"));
        repo.ok(&["restore", "--at", time, target.to_str().unwrap()]);
        assert_trees_equal(before, &target);
    }

    // Forgotten, not lost: verify passes and says so.
    let report = json(&repo.ok(&["verify", "--read-data", "--json"]));
    assert_eq!(report["forgotten_points"], 6 - kept.len() as u64, "{report}");
    assert!(report["errors"].as_array().unwrap().is_empty(), "{report}");
    // A manifest deleted by anything but forget is still an error.
    repo.delete_object(kept[0]);
    let err = repo.fails(&["verify"], 1);
    assert!(err.contains("is missing"), "{err}");

    // Run again, forget has nothing more to remove.
    let again = json(&repo.ok(&["forget", "--json"]));
    assert_eq!(again["sources"][0]["removed"], 0, "{again}");
}

/// Bad policies are refused with a clear message and change nothing.
#[test]
fn bad_policies_and_prune_options_are_refused_and_change_nothing() {
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    fs::write(work.path().join("f"), b"x").unwrap();
    repo.ok(&["backup", "--source", "s", work.path().to_str().unwrap()]);
    let before = repo.objects();
    for (args, says) in [
        (&["policy", "set"][..], "name at least one rule"),
        (&["policy", "set", "--keep-within=-1d"], "must be positive"),
        (&["policy", "set", "--keep-within", "soon"], "invalid span"),
        (&["policy", "set", "--keep-daily=-3"], "invalid value"),
        (&["policy", "set", "--keep-daily", "3", "--time-zone", "Mars/Olympus_Mons"], "unknown time zone"),
        (&["policy", "set", "--source", "../x", "--keep-last", "1"], "invalid source name"),
        (&["prune", "--max-unused", "150%"], "not between 0% and 100%"),
        (&["prune", "--max-unused", "lots"], "not a percentage"),
        (&["prune", "--memory", "lots"], "invalid size"),
    ] {
        let err = repo.fails(args, 2);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(repo.objects(), before, "refused policies and options write nothing");
    let shown = json(&repo.ok(&["policy", "show", "--json"]));
    assert!(shown[0]["policy"].is_null(), "{shown}");
}

/// Forget then prune: the packs only forgotten points used are condemned by one
/// run and deleted by a run after the grace (5 s here); every kept point still
/// restores as it did, verify --read-data passes, and the index files and the
/// forget record that only the forgotten points needed go too.
#[test]
fn prune_deletes_what_only_forgotten_points_used() {
    let repo = TestRepo::new(Backend::File).with_env("EBB_GRACE", "5s");
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    build_fidelity_tree(&src);
    let mut restored = Vec::new();
    for i in 0..5u64 {
        // Only this file changes: each point's new pack holds it and the trees above it.
        fs::write(src.join("changing"), pseudo_random_bytes(100 + i, 400_000)).unwrap();
        let point = json(&repo.ok(&["backup", "--json", "--source", "s", src.to_str().unwrap()]));
        let time = point["time"].as_str().unwrap().to_string();
        let dir = work.path().join(format!("before-{i}"));
        repo.ok(&["restore", "--at", &time, dir.to_str().unwrap()]);
        restored.push((time, dir));
    }
    repo.ok(&["policy", "set", "--keep-last", "2"]);
    let forgot = json(&repo.ok(&["forget", "--json"]));
    assert_eq!(forgot["sources"][0]["removed"], 3, "{forgot}");
    let count = |dir: &str| repo.objects().iter().filter(|o| o.starts_with(dir)).count();
    let (packs, index_files) = (count("packs/"), count("index/"));

    // Packs younger than the grace are never condemned (the unit tests show it);
    // these are older. A dry run changes nothing.
    std::thread::sleep(std::time::Duration::from_millis(5_100));
    let before = repo.objects();
    // Repacking (point 0's pack, mostly unused now) has a test of its own.
    let prune = ["prune", "--max-unused", "unlimited", "--json"];
    let dry = json(&repo.ok(&["prune", "--dry-run", "--max-unused", "unlimited", "--json"]));
    assert!(dry["condemned_packs"].as_u64().unwrap() >= 2, "{dry}");
    assert_eq!(repo.objects(), before, "a dry run changes nothing");
    let first = json(&repo.ok(&prune));
    let condemned = first["condemned_packs"].as_u64().unwrap();
    assert_eq!(first["condemned_packs"], dry["condemned_packs"], "the packs of three forgotten points: {first}");
    assert_eq!(first["deleted_packs"], 0, "{first}");
    assert_eq!(count("packs/"), packs, "nothing deleted within the grace");
    let again = json(&repo.ok(&prune));
    assert_eq!((again["condemned_packs"].as_u64(), again["waiting_sets"].as_u64()), (Some(0), Some(1)), "{again}");

    std::thread::sleep(std::time::Duration::from_millis(5_100));
    let swept = json(&repo.ok(&prune));
    assert_eq!(swept["deleted_packs"].as_u64(), Some(condemned), "{swept}");
    assert_eq!(count("packs/") as u64, packs as u64 - condemned);
    // Points 0 to 2 were forgotten. Point 0's pack also holds the rest of the tree,
    // which the kept points use: it stays (until repacking), and so do its index
    // file and the forget record that tells verify the point was forgotten.
    assert_eq!(count("index/"), index_files - 2, "the index files of the forgotten points 1 and 2");
    assert_eq!(count("forgotten/"), 1);
    assert_eq!(count("condemned/"), 0, "the swept set");
    assert_eq!(count("points/"), 2);

    let report = json(&repo.ok(&["verify", "--read-data", "--json"]));
    assert!(report["errors"].as_array().unwrap().is_empty(), "{report}");
    for (time, before) in &restored[3..] {
        let after = work.path().join(format!("after-{time}"));
        repo.ok(&["restore", "--at", time, after.to_str().unwrap()]);
        assert_trees_equal(before, &after);
    }
    // Nothing more to do.
    let idle = json(&repo.ok(&prune));
    assert_eq!((idle["condemned_packs"].as_u64(), idle["deleted_packs"].as_u64()), (Some(0), Some(0)), "{idle}");
}

/// The bytes of every object of a `file://` repository.
fn stored_bytes(repo: &TestRepo) -> u64 {
    let dir = repo.repo_dir().expect("a file:// repository");
    repo.objects().iter().map(|o| fs::metadata(dir.join(catalog::local_path(o).as_ref())).unwrap().len()).sum()
}

/// Eight points of a 12 MB tree, a tenth of its files changed between them, then
/// forgotten down to the last: prune (with 4 KiB of memory, so that it holds what
/// the point uses on disk) repacks the packs the last point uses only in
/// part, writes that point again to use the new packs (under its own name), and
/// deletes the old ones after the grace. The repository is then within 10 % of a
/// fresh one holding only that point, the point restores exactly, verify
/// --read-data passes, and a further prune has nothing left to do.
#[test]
fn pruned_down_to_one_point_the_repository_is_within_a_tenth_of_a_fresh_one() {
    let grace = std::time::Duration::from_millis(3_100);
    let repo = TestRepo::new(Backend::File).with_env("EBB_GRACE", "3s");
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    build_fidelity_tree(&src);
    let files = 60u64;
    for f in 0..files {
        fs::write(src.join(format!("file-{f:02}")), pseudo_random_bytes(1_000 + f, 200_000)).unwrap();
    }
    for i in 1..8u64 {
        for f in (0..files).filter(|f| (f + i * 7) % 10 == 0) {
            fs::write(src.join(format!("file-{f:02}")), pseudo_random_bytes(i * 1_000 + f, 200_000)).unwrap();
        }
        repo.ok(&["backup", "--source", "s", src.to_str().unwrap()]);
    }
    let last = json(&repo.ok(&["points", "--json"]));
    let last = last.as_array().unwrap().last().unwrap().clone();
    repo.ok(&["policy", "set", "--keep-last", "1"]);
    let forgot = json(&repo.ok(&["forget", "--json"]));
    assert_eq!(forgot["sources"][0]["removed"], 6, "{forgot}");
    let before = stored_bytes(&repo);

    std::thread::sleep(grace);
    // With little memory: what points use goes to disk, and the run does the same.
    let first = json(&repo.ok(&["prune", "--memory", "4KiB", "--json"]));
    assert!(first["spilled_bytes"].as_u64().unwrap() > 0, "{first}");
    assert!(first["repack"]["packs"].as_u64().unwrap() >= 1, "{first}");
    assert_eq!(first["repack"]["rewritten_points"], 1, "{first}");
    std::thread::sleep(grace);
    let swept = json(&repo.ok(&["prune", "--json"]));
    assert!(swept["deleted_packs"].as_u64().unwrap() >= first["condemned_packs"].as_u64().unwrap(), "{swept}");
    std::thread::sleep(grace);
    let idle = json(&repo.ok(&["prune", "--json"]));
    assert_eq!(
        (idle["repack"]["packs"].as_u64(), idle["condemned_packs"].as_u64(), idle["deleted_packs"].as_u64()),
        (Some(0), Some(0), Some(0)),
        "{idle}"
    );

    // The same point, under the same name, with the same content.
    let now = json(&repo.ok(&["points", "--json"]));
    assert_eq!(now.as_array().unwrap().len(), 1, "{now}");
    assert_eq!(now[0]["name"], last["name"], "{now}");
    let restored = work.path().join("restored");
    repo.ok(&["restore", "--at", last["time"].as_str().unwrap(), restored.to_str().unwrap()]);
    assert_trees_equal(&src, &restored);
    let report = json(&repo.ok(&["verify", "--read-data", "--json"]));
    assert!(report["errors"].as_array().unwrap().is_empty(), "{report}");

    let fresh = TestRepo::new(Backend::File);
    fresh.init();
    fresh.ok(&["backup", "--source", "s", src.to_str().unwrap()]);
    let (pruned, fresh) = (stored_bytes(&repo), stored_bytes(&fresh));
    assert!(
        pruned * 10 <= fresh * 11,
        "pruned to one point the repository holds {pruned} bytes (from {before}); a fresh one {fresh}"
    );
}
