namespace LoraKit; public static class Placeholder {}
