//! Closed sets of names: enums whose values have one fixed text, used as they are in evidence
//! JSON, logs, `plan` and `status` output, and as Prometheus label values.
//!
//! [`named!`] declares such an enum once: its variants and their text, `ALL` in declaration
//! order, `as_str`/`from_name`, `Display`, serde `Serialize` as the text, and
//! `EncodeLabelValue`. A value added to the enum is then known everywhere it is shown, and every
//! exhaustive `match` on it fails to compile until it says what the new value means there.

/// Declares a closed set of names (see the module documentation).
macro_rules! named {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order. (Not every named enum is listed, or parsed
            /// by [`Self::from_name`], outside the tests.)
            #[allow(dead_code)]
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The value with this text, if any.
            #[allow(dead_code)]
            pub fn from_name(name: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == name)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl prometheus_client::encoding::EncodeLabelValue for $name {
            fn encode(
                &self,
                encoder: &mut prometheus_client::encoding::LabelValueEncoder,
            ) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

pub(crate) use named;
