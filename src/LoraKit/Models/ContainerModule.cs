using static TorchSharp.torch;

namespace LoraKit.Models;

/// <summary>
/// A module whose child modules can be swapped after construction (an adapter wraps a Linear in place; a faster module replaces a reference one). TorchSharp refuses
/// to register a name twice, so the old registration is removed first; the public field of that name is updated too,
/// because forward() reads the field.
/// </summary>
public abstract class ContainerModule(string name) : nn.Module<Tensor, Tensor>(name)
{
    public void ReplaceChild(string childName, nn.Module<Tensor, Tensor> child)
    {
        var field = GetType().GetField(childName) ?? throw new ArgumentException($"{GetType().Name} has no child '{childName}'");
        if (!field.FieldType.IsAssignableFrom(child.GetType()))
            throw new ArgumentException($"{GetType().Name}.{childName} cannot hold a {child.GetType().Name}");
        if (ReferenceEquals(field.GetValue(this), child)) return; // already there: keep its registration (and its place)
        field.SetValue(this, child);
        _internal_submodules.Remove(childName);
        register_module(childName, child);
    }
}
