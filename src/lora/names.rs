//! kohya module names (temporary: SD1/SD2 only; SDXL's SGM names come with ldm_keys).
use crate::model::load::Family;

pub fn kohya_name(family: Family, component: &str, path: &str) -> String {
    let prefix = match (component, family) {
        ("unet", _) => "lora_unet",
        ("text_encoder", Family::Sdxl) => "lora_te1",
        ("text_encoder", _) => "lora_te",
        _ => "lora_te2",
    };
    format!("{prefix}_{}", path.replace('.', "_"))
}
