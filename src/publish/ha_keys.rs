//! The discovery keys Home Assistant's MQTT integration accepts, per platform, as its source
//! defines them (homeassistant/components/mqtt in Core 2026.2.3: the `vol.Optional` /
//! `vol.Required` schemas of schemas.py, entity.py and each platform's module), with
//! `object_id` left out: deprecated in 2025.10 for `default_entity_id`, ignored from 2026.4.
//! Home Assistant drops an unknown key without a word, so the tests hold every discovery
//! payload to these lists themselves. Test data only.

/// Keys every MQTT entity platform accepts.
pub const COMMON: &[&str] = &[
    "name",
    "unique_id",
    "default_entity_id",
    "device",
    "origin",
    "availability",
    "availability_topic",
    "availability_mode",
    "availability_template",
    "payload_available",
    "payload_not_available",
    "entity_category",
    "entity_picture",
    "icon",
    "enabled_by_default",
    "json_attributes_topic",
    "json_attributes_template",
    "qos",
    "encoding",
];

/// Keys of the `device` map.
pub const DEVICE: &[&str] = &[
    "identifiers",
    "connections",
    "manufacturer",
    "model",
    "model_id",
    "name",
    "hw_version",
    "sw_version",
    "serial_number",
    "suggested_area",
    "via_device",
    "configuration_url",
];

/// Keys of the `origin` map (`name` required).
pub const ORIGIN: &[&str] = &["name", "sw_version", "support_url"];

/// The platform's own keys, and those it requires; `None` for a platform not listed here.
pub fn platform(name: &str) -> Option<(&'static [&'static str], &'static [&'static str])> {
    Some(match name {
        "binary_sensor" => (
            &[
                "state_topic",
                "value_template",
                "device_class",
                "expire_after",
                "force_update",
                "off_delay",
                "payload_off",
                "payload_on",
            ],
            &["state_topic"],
        ),
        "event" => (&["state_topic", "value_template", "device_class", "event_types"], &["state_topic", "event_types"]),
        "sensor" => (
            &[
                "state_topic",
                "value_template",
                "device_class",
                "expire_after",
                "force_update",
                "last_reset_value_template",
                "options",
                "suggested_display_precision",
                "state_class",
                "unit_of_measurement",
            ],
            &["state_topic"],
        ),
        "switch" => (
            &[
                "command_topic",
                "command_template",
                "optimistic",
                "retain",
                "state_topic",
                "value_template",
                "payload_off",
                "payload_on",
                "state_off",
                "state_on",
                "device_class",
            ],
            &["command_topic"],
        ),
        "number" => (
            &[
                "command_topic",
                "command_template",
                "optimistic",
                "retain",
                "state_topic",
                "value_template",
                "device_class",
                "max",
                "min",
                "mode",
                "payload_reset",
                "step",
                "unit_of_measurement",
            ],
            &["command_topic"],
        ),
        "image" => (&["image_topic", "url_topic", "content_type", "image_encoding", "url_template"], &[]),
        _ => return None,
    })
}
