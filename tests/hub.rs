//! Hugging Face ids resolve from a local cache laid out like huggingface_hub's, offline.
use sdlora::model::load::{load, LoadOptions};

#[test]
fn hub_id_loads_from_the_local_cache() {
    let cache = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hf_cache/hub");
    // The cache is found through the environment, which is the whole process's: the body runs in
    // a child process of this test binary, alone, so no other test reads it while it changes.
    if std::env::var_os("SDLORA_HUB_TEST_CHILD").is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "hub::hub_id_loads_from_the_local_cache", "--test-threads", "1"])
            .env("SDLORA_HUB_TEST_CHILD", "1")
            .env("HF_HUB_CACHE", cache)
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        return;
    }
    let opts = LoadOptions { vae: false, text_encoders: false, ..Default::default() };
    let hub = load("tiny/sd1", &opts).unwrap();
    let folder = load(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sd1/pipe"), &opts).unwrap();
    let (a, b) = (&hub.unet.as_ref().unwrap().conv_in.weight, &folder.unet.as_ref().unwrap().conv_in.weight);
    assert_eq!(a.to_vec_flat(), b.to_vec_flat());
    // a pinned revision by commit hash, and one that is not cached
    let rev = std::fs::read_to_string(format!("{cache}/models--tiny--sd1/refs/main")).unwrap();
    assert!(load(&format!("tiny/sd1@{}", rev.trim()), &opts).is_ok());
    let err = load("tiny/sd1@v9", &opts).err().unwrap().to_string();
    assert!(err.contains("revision `v9`"), "{err}");
    // not cached: with HF_HUB_OFFLINE it is not downloaded, and the error says so
    // SAFETY: this child process runs this one test on one thread.
    unsafe { std::env::set_var("HF_HUB_OFFLINE", "1") };
    let err = load("nobody/nothing", &opts).err().unwrap().to_string();
    assert!(err.contains("not in the Hugging Face cache") && err.contains("HF_HUB_OFFLINE"), "{err}");
}

trait Flat {
    fn to_vec_flat(&self) -> Vec<f32>;
}

impl Flat for candle_core::Tensor {
    fn to_vec_flat(&self) -> Vec<f32> {
        self.flatten_all().unwrap().to_vec1().unwrap()
    }
}
